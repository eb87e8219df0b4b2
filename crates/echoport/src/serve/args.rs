//! The flags of `echoport serve`, as clap parses them (nothing checked yet: see `settings`).

use anyhow::bail;

/// The default listen addresses: loopback only, IPv4 and IPv6.
/// `--help` headings: the flags an operator needs come first (no heading), then these.
const LIMITS: &str = "Limits and timeouts";
const BUFFERS: &str = "Buffers";
const UDP: &str = "UDP echo";
const DEPLOY: &str = "Deployment";
const TUNING: &str = "Tuning and measurement (what the benchmarks compare)";

pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:7007", "[::1]:7007"];

/// Options of `echoport serve`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    echoport serve                          # 127.0.0.1:7007 and [::1]:7007\n  \
    echoport serve -l 0.0.0.0:7007          # every IPv4 interface (think first)\n  \
    echoport serve --threads 1 --backend epoll\n\n\
    Every size and count is checked at start-up: a value that cannot work is a one-line error \
    naming the flag and its valid range; one that can be rounded (--buffers, --cq-entries to \
    a power of two) is rounded, and the start-up line says so and prints the values in effect.")]
pub struct Args {
    /// Address to listen on; repeat for several. Loopback only by default; name a wider
    /// address (0.0.0.0:7007, [::]:7007) only when you mean to expose the server.
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Serve the live counters in Prometheus text format on http://ADDR/metrics (e.g.
    /// 127.0.0.1:9100): connections, bytes echoed, refusals, timeouts, UDP drops, per worker.
    /// Off by default; a loopback address unless --metrics-public.
    #[arg(help_heading = DEPLOY, long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Allow --metrics on a non-loopback address (the counters describe the server's
    /// traffic to anyone who can reach them).
    #[arg(help_heading = DEPLOY, long, requires = "metrics")]
    pub metrics_public: bool,

    /// Every TCP connection must begin with a PROXY protocol header, v1 (text) or v2
    /// (binary), as a load balancer sends it (HAProxy `send-proxy` / `send-proxy-v2`): the
    /// header is never echoed, and per-IP limits and logs use the client it names. v2 LOCAL
    /// (health checks) and v1 UNKNOWN are served as the balancer itself. A connection without
    /// a valid header, or from a peer outside --proxy-from, is closed and counted. TCP only.
    #[arg(help_heading = DEPLOY, long)]
    pub proxy_protocol: bool,

    /// With --proxy-protocol: who may send a header (the balancers), as networks or single
    /// addresses, e.g. `10.0.0.0/8 2001:db8::/32 192.0.2.7`; repeatable. Every other peer is
    /// closed at accept, before anything is read. IPv4 and IPv6 do not cross: `0.0.0.0/0
    /// ::/0` is everyone. Default: loopback (127.0.0.0/8 ::1).
    #[arg(help_heading = DEPLOY, long, value_name = "CIDR", num_args = 1.., requires = "proxy_protocol")]
    pub proxy_from: Vec<String>,

    /// With --proxy-protocol: seconds after accept by which the whole header must have
    /// arrived (bytes trickling in do not extend it), more than 0 and at most 3600.
    #[arg(help_heading = DEPLOY, long, value_name = "SECS", default_value_t = 5.0)]
    pub proxy_timeout: f64,

    /// Event-loop threads (1 to 1024), each with its own ring (or epoll set) and listener; on
    /// Windows each with its own completion port, one of them accepting for all.
    /// Default: the number of CPUs.
    #[arg(short, long, value_name = "N")]
    pub threads: Option<usize>,

    /// How the threads share a listen address. `reuseport` (the default on Linux): each
    /// thread its own listening socket (SO_REUSEPORT), the kernel hashing every new
    /// connection to one of them. `shared`: one listening socket that every thread accepts
    /// from, whichever the kernel wakes taking the connection (what Windows always does, and
    /// what sockets passed in by systemd use). docs/ARCHITECTURE.md says which to pick and why.
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
    /// received before connections are cut: 0 or more; `inf` (or any value too large for the
    /// clock) waits forever. A second signal exits at once.
    #[arg(help_heading = LIMITS, long, value_name = "SECS", default_value_t = 10.0)]
    pub shutdown_timeout: f64,

    /// Bytes one connection may hold received but not yet echoed (at least 1); past this the
    /// server stops reading from it until its peer reads the echo.
    #[arg(help_heading = LIMITS, long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub max_pending: u32,

    /// Connections the server holds at most (at least 1); more are closed at once (and
    /// counted). Default: what the backend can hold: the io_uring direct-descriptor tables,
    /// or the process's descriptor limit less a reserve. At start-up the soft descriptor
    /// limit is raised to the hard limit, and the start-up line says what it derived.
    #[arg(help_heading = LIMITS, long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections one source IP address may hold at once (at least 1); more are closed at
    /// once. (With io_uring this accepts into plain descriptors, to learn peers' addresses.)
    #[arg(help_heading = LIMITS, long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,

    /// Also echo UDP datagrams (RFC 862) on the same addresses and ports. Off by default:
    /// UDP echo can be abused for reflection, so replies are refused to service and
    /// privileged ports, our own ports, broadcast, multicast and unspecified sources (also
    /// when an IPv6 source carries one: IPv4-mapped, NAT64, 6to4, Teredo; and the
    /// deprecated IPv4-compatible form), and rate-limited.
    #[arg(help_heading = UDP, long)]
    pub udp: bool,

    /// UDP: replies per second to one source address, over all listen addresses together
    /// (with a burst of twice that); > 0.
    #[arg(help_heading = UDP, long, value_name = "PPS", default_value_t = 100.0)]
    pub udp_rate: f64,

    /// UDP: replies per second in total, one budget for all listen addresses (with a burst
    /// of one second's worth); > 0.
    #[arg(help_heading = UDP, long, value_name = "PPS", default_value_t = 20_000.0)]
    pub udp_global_rate: f64,

    /// Seconds a connection may stay silent (nothing received, no echo owed) before it is
    /// closed. 0 (or inf) turns it off.
    #[arg(help_heading = LIMITS, long, value_name = "SECS", default_value_t = 300.0)]
    pub idle_timeout: f64,

    /// Seconds a connection's pending echo may make no progress (its peer stopped reading)
    /// before the connection is closed. 0 (or inf) turns it off.
    #[arg(help_heading = LIMITS, long, value_name = "SECS", default_value_t = 30.0)]
    pub write_timeout: f64,

    /// Size of one receive buffer in bytes, 64 to 16777216 (16 MiB); with --buffers at most
    /// 4 GiB of buffers per thread.
    #[arg(help_heading = BUFFERS, long, value_name = "BYTES", default_value_t = echoport_io::pool::PoolConfig::DEFAULT_BUF_SIZE)]
    pub buf_size: u32,

    /// Receive buffers per thread, 1 to 32768, rounded up to a power of two (io_uring's
    /// provided-buffer ring needs one; every backend uses the rounded count).
    #[arg(help_heading = BUFFERS, long, value_name = "N", default_value_t = echoport_io::pool::PoolConfig::DEFAULT_BUFFERS)]
    pub buffers: u32,

    /// io_uring: completion queue entries per ring, 256 to 65536, rounded up to a power of
    /// two (as the kernel does). Below 256 the queue overflows under a hundred busy
    /// connections and every echo waits on the kernel's overflow list; the kernel counts
    /// what does not fit and so does echoport (cq_overflows).
    #[arg(help_heading = TUNING, long, value_name = "N", default_value_t = 65536)]
    pub cq_entries: u32,

    /// io_uring: slots in each ring's direct-descriptor table, 4 to 1048576 (at most the
    /// process's descriptor limit, the kernel's ceiling). Default: that limit. Each worker
    /// adds rings as tables fill, so this changes how many rings hold the connections, not
    /// how many connections there may be; for tests and measurement.
    #[arg(help_heading = TUNING, long, value_name = "N")]
    pub ring_table_size: Option<u32>,

    /// Testing only: let --cq-entries go below 256 (down to 1), so a test can force the
    /// completion queue to overflow and check that no completion is lost.
    #[arg(long, hide = true)]
    pub cq_entries_below_floor: bool,

    /// io_uring: let completions gather for up to this many microseconds (0 to 1000000)
    /// before the loop wakes (the kernel's minimum wait on 6.12+; on older kernels only when
    /// busy), trading at most that much latency for fewer wake-ups per echo. An idle loop and
    /// a lone message after a quiet spell are unaffected. 0 = off.
    #[arg(help_heading = TUNING, long, value_name = "USEC", default_value_t = 0)]
    pub batch_wait_us: u32,

    /// io_uring: adaptive completion moderation. While completions arrive fast enough that
    /// a batch fills within this many microseconds (0 to 10000), a wait holds up to this
    /// long for more before the loop wakes: fewer wake-ups per echo under load, at most this
    /// much added latency, and none at low load (the hold is granted only while the rate
    /// says it pays). Needs the kernel's minimum wait (6.12+). 0 = off.
    #[arg(help_heading = TUNING, long, value_name = "USEC",
          default_value_t = crate::serve::settings::DEFAULT_MAX_ADDED_LATENCY_US)]
    pub max_added_latency_us: u32,

    /// io_uring: how the kernel runs completion work: `defer` (DEFER_TASKRUN, the default,
    /// falling back to `coop` on kernels before 6.1), `coop` (COOP_TASKRUN), or `interrupt`
    /// (neither; only for measuring what the flags buy).
    #[arg(help_heading = TUNING, long, value_enum, default_value_t = TaskRunChoice::Defer)]
    pub taskrun: TaskRunChoice,

    /// io_uring: use plain one-shot operations (no multishot, no buffer ring, no direct
    /// descriptors), as on older kernels.
    #[arg(help_heading = TUNING, long)]
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
    pub fn name(self) -> &'static str {
        match self {
            ListenerMode::Reuseport => "reuseport",
            ListenerMode::Shared => "shared",
        }
    }

    /// This platform's default: SO_REUSEPORT where it exists.
    pub fn platform_default() -> ListenerMode {
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
}
