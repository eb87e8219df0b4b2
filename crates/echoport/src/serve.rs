//! `echoport serve`: bind the listeners, start one event loop per thread, stop on a signal.
//!
//! Each worker thread owns one backend instance (one io_uring ring, one epoll set, ...) and
//! its own listening socket per address (`SO_REUSEPORT`, so the kernel spreads connections
//! over the threads); nothing is shared between threads but the stop flag.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context};
use echoport_core::stats::Stats;
use echoport_core::worker::{Admission, Config, Worker};
use echoport_core::{Backend, Waker};
use socket2::{Domain, Protocol, Socket, Type};

/// Winsock's codes for the two errors `bind_all` forgives on default addresses.
#[cfg(windows)]
mod libc {
    pub const EAFNOSUPPORT: i32 = 10047;
    pub const EADDRNOTAVAIL: i32 = 10049;
}

/// The default listen addresses: loopback only, IPv4 and IPv6.
pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:7007", "[::1]:7007"];

/// Options of `echoport serve`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    echoport serve                          # 127.0.0.1:7007 and [::1]:7007\n  \
    echoport serve -l 0.0.0.0:7007          # every IPv4 interface (think first)\n  \
    echoport serve --threads 1 --backend epoll")]
pub struct Args {
    /// Address to listen on; repeat for several. Loopback only by default; name a wider
    /// address (0.0.0.0:7007, [::]:7007) only when you mean to expose the server.
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Event-loop threads, each with its own ring (or epoll set) and listener; on Windows
    /// each with its own completion port, one of them accepting for all.
    /// Default: the number of CPUs.
    #[arg(short, long, value_name = "N")]
    pub threads: Option<usize>,

    /// How the threads share a listen address. `reuseport` (the default on Linux): each
    /// thread its own listening socket (SO_REUSEPORT), the kernel hashing every new
    /// connection to one of them. `shared`: one listening socket that every thread accepts
    /// from, whichever the kernel wakes taking the connection (what Windows always does).
    /// docs/ARCHITECTURE.md says which to pick and why.
    #[arg(long, value_enum, value_name = "MODE")]
    pub listener: Option<ListenerMode>,

    /// Pin worker threads to these CPUs, in order (e.g. "0", "0,1", "0-3").
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,

    /// I/O backend. `auto` uses io_uring when the kernel allows it and epoll otherwise,
    /// saying why (on Windows: IOCP); naming one is strict and fails if it cannot start.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Seconds a graceful stop (SIGINT/SIGTERM; Ctrl-C on Windows) may take to echo what was
    /// received before connections are cut. A second signal exits at once.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub shutdown_timeout: f64,

    /// Bytes one connection may hold received but not yet echoed; past this the server stops
    /// reading from it until its peer reads the echo.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub max_pending: u32,

    /// Connections the server holds at most; more are closed at once (and counted).
    /// Default: what the backend can hold: the io_uring direct-descriptor tables, or the
    /// process's descriptor limit less a reserve.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections one source IP address may hold at once; more are closed at once.
    /// (With io_uring this accepts into plain descriptors, to learn peers' addresses.)
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,

    /// Also echo UDP datagrams (RFC 862) on the same addresses and ports. Off by default:
    /// UDP echo can be abused for reflection, so replies are refused to service and
    /// privileged ports, our own ports, broadcast, multicast and unspecified sources (also
    /// when an IPv6 source carries one: IPv4-mapped, NAT64, 6to4, Teredo; and the
    /// deprecated IPv4-compatible form), and rate-limited.
    #[arg(long)]
    pub udp: bool,

    /// UDP: replies per second to one source address, over all listen addresses together
    /// (with a burst of twice that).
    #[arg(long, value_name = "PPS", default_value_t = 100.0)]
    pub udp_rate: f64,

    /// UDP: replies per second in total, one budget for all listen addresses (with a burst
    /// of one second's worth).
    #[arg(long, value_name = "PPS", default_value_t = 20_000.0)]
    pub udp_global_rate: f64,

    /// Seconds a connection may stay silent (nothing received, no echo owed) before it is
    /// closed. 0 turns it off.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub idle_timeout: f64,

    /// Seconds a connection's pending echo may make no progress (its peer stopped reading)
    /// before the connection is closed. 0 turns it off.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub write_timeout: f64,

    /// Size of one receive buffer in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    pub buf_size: u32,

    /// Receive buffers per thread (a power of two; io_uring's provided-buffer ring).
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub buffers: u32,

    /// io_uring: completion queue entries per ring (the kernel holds back what does not fit
    /// and echoport counts it as an overflow).
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub cq_entries: u32,

    /// io_uring: let completions gather for up to this many microseconds before the loop
    /// wakes (the kernel's minimum wait on 6.12+; on older kernels only when busy),
    /// trading at most that much latency for fewer wake-ups per echo. An idle loop and a
    /// lone message after a quiet spell are unaffected. 0 = off.
    #[arg(long, value_name = "USEC", default_value_t = 0)]
    pub batch_wait_us: u32,

    /// io_uring: how the kernel runs completion work: `defer` (DEFER_TASKRUN, the default,
    /// falling back to `coop` on kernels before 6.1), `coop` (COOP_TASKRUN), or `interrupt`
    /// (neither; only for measuring what the flags buy).
    #[arg(long, value_enum, default_value_t = TaskRunChoice::Defer)]
    pub taskrun: TaskRunChoice,

    /// io_uring: use plain one-shot operations (no multishot, no buffer ring, no direct
    /// descriptors), as on older kernels.
    #[arg(long)]
    pub no_fast_path: bool,
}

/// io_uring task-running mode (see `--taskrun`).
#[derive(clap::ValueEnum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum TaskRunChoice {
    /// DEFER_TASKRUN.
    Defer,
    /// COOP_TASKRUN.
    Coop,
    /// Neither.
    Interrupt,
}

/// How worker threads share a listen address (see `--listener`).
#[derive(clap::ValueEnum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ListenerMode {
    /// A listening socket per thread, bound with SO_REUSEPORT (Linux only).
    Reuseport,
    /// One listening socket, every thread accepting from it.
    Shared,
}

impl ListenerMode {
    /// The flag's spelling, for the start-up line.
    fn name(self) -> &'static str {
        match self {
            ListenerMode::Reuseport => "reuseport",
            ListenerMode::Shared => "shared",
        }
    }

    /// This platform's default: SO_REUSEPORT where it exists.
    fn platform_default() -> ListenerMode {
        if cfg!(windows) {
            ListenerMode::Shared
        } else {
            ListenerMode::Reuseport
        }
    }
}

/// Which I/O backend to run.
#[derive(clap::ValueEnum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring if it works here, else epoll.
    Auto,
    /// Linux io_uring only.
    IoUring,
    /// Linux epoll only.
    Epoll,
    /// Windows I/O completion ports (what `auto` means on Windows).
    #[cfg(windows)]
    Iocp,
}

/// Runs the server until stopped; exit code 0 after a graceful stop.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let secs = |name: &str, v: f64| -> anyhow::Result<Option<Duration>> {
        if !(v.is_finite() && v >= 0.0) {
            bail!("--{name} must be a number of seconds >= 0");
        }
        Ok((v > 0.0).then(|| Duration::from_secs_f64(v)))
    };
    let shutdown_timeout = secs("shutdown-timeout", args.shutdown_timeout)?.unwrap_or_default();
    let idle_timeout = secs("idle-timeout", args.idle_timeout)?;
    let write_timeout = secs("write-timeout", args.write_timeout)?;
    let cpus = match &args.cpus {
        Some(list) => parse_cpu_list(list)?,
        None => Vec::new(),
    };
    let explicit = !args.listen.is_empty();
    let specs: Vec<String> = if explicit {
        args.listen.clone()
    } else {
        DEFAULT_LISTEN.iter().map(|s| s.to_string()).collect()
    };
    let mode = args.listener.unwrap_or_else(ListenerMode::platform_default);
    if cfg!(windows) && mode == ListenerMode::Reuseport {
        bail!("--listener reuseport: Windows has no SO_REUSEPORT; its threads always share one listening socket");
    }
    let listeners = bind_all(&specs, threads, explicit, mode)?;
    let addrs: Vec<SocketAddr> = listeners[0]
        .iter()
        .map(|l| l.local_addr().expect("bound socket has an address"))
        .collect();

    let cfg = Config {
        limits: echoport_core::conn::Limits {
            max_pending: args.max_pending.max(1),
        },
        shutdown_timeout,
        admission: Admission::with_per_ip(
            args.max_connections.unwrap_or(usize::MAX),
            args.max_connections_per_ip,
        ),
        idle_timeout,
        write_timeout,
    };
    let admission = cfg.admission.clone();
    let opts = crate::backends::Options::from_serve(&args);
    let chosen = crate::backends::choose(args.backend, &opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    echoport_io::sys::block_stop_signals()?;

    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Ready>>();
    let mut handles = Vec::new();
    for (i, socks) in listeners.into_iter().enumerate() {
        let ready = ready_tx.clone();
        let cfg = cfg.clone();
        let stop = stop.clone();
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let opts = opts.clone();
        let chosen = chosen.clone();
        let h = std::thread::Builder::new()
            .name(format!("echoport-w{i}"))
            .spawn(move || -> anyhow::Result<Stats> {
                if let Some(cpu) = cpu {
                    echoport_io::sys::pin_to_cpu(cpu)
                        .with_context(|| format!("pinning to CPU {cpu}"))?;
                }
                match crate::backends::open(&chosen, &opts) {
                    #[cfg(target_os = "linux")]
                    Ok(crate::backends::AnyBackend::Uring(b)) => {
                        serve_on(*b, socks, cfg, stop, &ready)
                    }
                    #[cfg(target_os = "linux")]
                    Ok(crate::backends::AnyBackend::Epoll(b)) => {
                        serve_on(*b, socks, cfg, stop, &ready)
                    }
                    #[cfg(windows)]
                    Ok(crate::backends::AnyBackend::Iocp(b)) => {
                        serve_on(*b, socks, cfg, stop, &ready)
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready.send(Err(anyhow::anyhow!("{msg}")));
                        Err(e)
                    }
                }
            })
            .context("spawning a worker thread")?;
        handles.push(h);
    }
    drop(ready_tx);

    let mut wakers = Vec::new();
    let mut describes: Vec<String> = Vec::new();
    let mut failure = None;
    let mut tables = Some(0usize);
    for r in ready_rx.iter().take(threads) {
        match r {
            Ok(ready) => {
                wakers.push(ready.waker);
                if !describes.contains(&ready.describe) {
                    describes.push(ready.describe);
                }
                tables = tables.zip(ready.max_connections).map(|(a, b)| a + b);
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if args.max_connections.is_none() {
        // Direct descriptors: every ring's table; plain descriptors: the process limit,
        // keeping some for listeners, rings and logs.
        let fds = echoport_io::sys::nofile_limit().saturating_sub(64) as usize;
        admission.set_max(tables.unwrap_or(fds).max(1));
    }
    if let Some(e) = failure {
        stop.store(true, std::sync::atomic::Ordering::Release);
        for w in &wakers {
            w.wake();
        }
        return Err(e);
    }
    let udp = if args.udp {
        if !(args.udp_rate > 0.0 && args.udp_global_rate > 0.0) {
            bail!("--udp-rate and --udp-global-rate must be positive");
        }
        let limits = echoport_core::udp::UdpLimits {
            per_source_rate: args.udp_rate,
            per_source_burst: (args.udp_rate * 2.0).max(1.0),
            global_rate: args.udp_global_rate,
            ..Default::default()
        };
        match crate::udp::spawn(&addrs, limits, stop.clone()) {
            Ok(h) => h,
            Err(e) => {
                stop.store(true, std::sync::atomic::Ordering::Release);
                for w in &wakers {
                    w.wake();
                }
                return Err(e);
            }
        }
    } else {
        Vec::new()
    };
    echoport_io::sys::handle_stop_signals(stop.clone(), wakers)?;
    // One line that says which backend serves, and why not io_uring when it is not.
    let describe = describes.join(" + ");
    let addrs_list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    match &chosen.fallback {
        Some(why) => tracing::info!(
            backend = %describe,
            why_not_io_uring = %why,
            threads,
            listener = %mode.name(),
            max_connections = admission.max(),
            addrs = %addrs_list,
            "echoport serving"
        ),
        None => tracing::info!(
            backend = %describe,
            threads,
            listener = %mode.name(),
            max_connections = admission.max(),
            addrs = %addrs_list,
            "echoport serving"
        ),
    }
    for a in &addrs {
        tracing::info!("listening on {a}");
    }

    let mut total = Stats::default();
    let mut accepted = Vec::with_capacity(threads);
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
    let mut udp_total = echoport_core::udp::UdpStats::default();
    for h in udp {
        if let Ok(s) = h.join() {
            udp_total.merge(&s);
        }
    }
    // How the listener mode spread the connections over the threads.
    let per_thread = accepted.join(",");
    if args.udp {
        tracing::info!(%total, udp = %udp_total, accepted_per_thread = %per_thread, "stopped");
    } else {
        tracing::info!(%total, accepted_per_thread = %per_thread, "stopped");
    }
    match error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// What a worker thread reports once its backend is up.
struct Ready {
    waker: Arc<dyn Waker>,
    describe: String,
    max_connections: Option<usize>,
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
    Ok(Worker::new(backend, &ids, cfg, stop).run()?)
}

/// Resolves every listen spec and binds `threads` sockets to each (one per worker thread).
///
/// Returns the sockets grouped by thread. Default addresses that cannot be bound because the
/// address family is missing (no IPv6 on the host) are skipped with a warning; anything
/// named explicitly must bind or the whole start fails.
pub fn bind_all(
    specs: &[String],
    threads: usize,
    explicit: bool,
    mode: ListenerMode,
) -> anyhow::Result<Vec<Vec<TcpListener>>> {
    let mut per_thread: Vec<Vec<TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    for spec in specs {
        let addrs: Vec<SocketAddr> = spec
            .to_socket_addrs()
            .with_context(|| format!("bad listen address {spec:?} (expected HOST:PORT, e.g. 127.0.0.1:7007 or [::1]:7007)"))?
            .collect();
        let Some(&addr) = addrs.first() else {
            bail!("listen address {spec:?} resolves to nothing");
        };
        match bind_group(addr, threads, mode) {
            Ok(group) => {
                for (t, l) in group.into_iter().enumerate() {
                    per_thread[t].push(l);
                }
            }
            Err(e)
                if !explicit
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                    ) =>
            {
                tracing::warn!("skipping default address {addr}: {e}");
            }
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        " (another process is listening there; pick another port with --listen)"
                    }
                    std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                    std::io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
                    _ => "",
                };
                bail!("cannot listen on {addr}: {e}{hint}");
            }
        }
    }
    if per_thread[0].is_empty() {
        bail!("no address to listen on");
    }
    Ok(per_thread)
}

/// Binds `n` listening sockets to one address. `Shared`: one socket and `n - 1` duplicates
/// of its descriptor. `Reuseport`: `n` sockets sharing the port with `SO_REUSEPORT`; a plain
/// bind first makes sure nobody else holds the port (reuseport would otherwise let us
/// silently share it with another process of the same user).
#[cfg(unix)]
fn bind_group(addr: SocketAddr, n: usize, mode: ListenerMode) -> std::io::Result<Vec<TcpListener>> {
    let first = listener(addr, false)?;
    if n == 1 {
        return Ok(vec![first]);
    }
    if mode == ListenerMode::Shared {
        return shared_group(first, n);
    }
    let port = first.local_addr()?.port();
    drop(first);
    let mut addr = addr;
    addr.set_port(port);
    (0..n).map(|_| listener(addr, true)).collect()
}

/// Windows has no `SO_REUSEPORT`: one listening socket per address, and the other threads get
/// clones of it, which tell their IOCP backend to join the group the first one deals accepted
/// connections to (see `echoport_io::iocp`).
#[cfg(windows)]
fn bind_group(
    addr: SocketAddr,
    n: usize,
    _mode: ListenerMode,
) -> std::io::Result<Vec<TcpListener>> {
    shared_group(listener(addr, false)?, n)
}

/// `first` and `n - 1` duplicates of its descriptor: one accept queue for `n` threads.
fn shared_group(first: TcpListener, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let mut group = Vec::with_capacity(n);
    group.push(first);
    for _ in 1..n {
        let dup = group[0].try_clone()?;
        group.push(dup);
    }
    Ok(group)
}

fn listener(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(windows)]
    {
        // SO_REUSEADDR means port stealing on Windows: ask for the opposite.
        let _ = reuseport;
        echoport_io::sys::exclusive_addr_use(&s)?;
    }
    #[cfg(unix)]
    {
        s.set_reuse_address(true)?;
        if reuseport {
            s.set_reuse_port(true)?;
        }
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: an echo sent in two
    // pieces must not wait ~40 ms for the client's delayed ACK.
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Parses "0", "0,2", "0-3", "0-1,4" into CPU numbers.
pub fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("bad CPU list {list:?} (expected e.g. 0,1 or 0-3)");
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            if a > b {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    if out.is_empty() {
        bail!("empty CPU list");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn port_in_use_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = taken.local_addr().unwrap().to_string();
        let err = bind_all(&[spec], 2, true, ListenerMode::Reuseport)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot listen on") && err.contains("another process"),
            "{err}"
        );
    }

    #[test]
    fn bad_address_is_a_clear_error() {
        let err = bind_all(&["nonsense".into()], 1, true, ListenerMode::Reuseport)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad listen address"), "{err}");
    }

    #[test]
    fn port_zero_gives_every_thread_the_same_port() {
        for mode in [ListenerMode::Reuseport, ListenerMode::Shared] {
            if cfg!(windows) && mode == ListenerMode::Reuseport {
                continue; // rejected before binding on Windows
            }
            let g = bind_all(&["127.0.0.1:0".into()], 3, true, mode).unwrap();
            let ports: Vec<u16> = g
                .iter()
                .map(|t| t[0].local_addr().unwrap().port())
                .collect();
            assert!(
                ports.iter().all(|&p| p == ports[0] && p != 0),
                "{mode:?}: {ports:?}"
            );
        }
    }

    #[test]
    fn shared_listeners_are_one_accept_queue() {
        let g = bind_all(&["127.0.0.1:0".into()], 3, true, ListenerMode::Shared).unwrap();
        let addr = g[0][0].local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        // The connection waits in the one queue, so the last thread's socket can take it.
        let last = &g[2][0];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match last.accept() {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "never accepted");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        assert!(
            matches!(g[0][0].accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the connection was accepted twice"
        );
    }
}
