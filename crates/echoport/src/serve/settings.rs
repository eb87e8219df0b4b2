//! Checking `echoport serve`'s flags before anything starts: a value that cannot work is a
//! one-line error naming the flag and its valid range, a value that can be rounded is rounded
//! (and the start-up line says so), and durations become what the worker needs.

use std::fmt::Display;
use std::time::Duration;

use anyhow::bail;

use echoport_core::proxy::Cidr;
use echoport_core::worker::ProxyConfig;
use echoport_io::pool::PoolConfig;

use super::args::Args;

/// Most event-loop threads (far past any machine's useful count; a typo guard).
pub const MAX_THREADS: usize = 1024;
/// Smallest receive buffer: a smaller buffer makes every few bytes cost a completion and a
/// buffer, so one connection's pending echo (`--max-pending`) would need more buffers than a
/// ring can hold. One definition, the pool's.
pub const MIN_BUF_SIZE: u32 = PoolConfig::MIN_BUF_SIZE;
/// Largest receive buffer (16 MiB).
pub const MAX_BUF_SIZE: u32 = PoolConfig::MAX_BUF_SIZE;
/// Most receive buffers per thread: io_uring's provided-buffer ring holds at most 2^15.
pub const MAX_BUFFERS: u32 = PoolConfig::MAX_BUFFERS;
/// Most buffer memory per thread (4 GiB).
pub const MAX_POOL_BYTES: u64 = 1 << 32;
/// Smallest io_uring completion queue. Each connection has a multishot receive and a send
/// posted; a completion queue this small already fills between two reaps under a hundred
/// busy connections (measured: 64 entries overflowed ~1,000 times a second with 100
/// connections, 256 entries a handful of times with 1,000), and each overflow sends the
/// kernel to its slow path (older kernels drop the completions: EBADR). The default is
/// 65536; 256 is the floor where overflows stay rare at ordinary load.
pub const MIN_CQ_ENTRIES: u32 = 256;
/// Largest io_uring completion queue the kernel accepts (`IORING_MAX_CQ_ENTRIES`).
pub const MAX_CQ_ENTRIES: u32 = 1 << 16;
/// Who may send a PROXY header when `--proxy-from` is not given: loopback, as the listen
/// addresses default to.
pub const DEFAULT_PROXY_FROM: [&str; 2] = ["127.0.0.0/8", "::1"];
/// Longest `--proxy-timeout`: an hour (a header is a single segment; a balancer that takes
/// longer is broken).
pub const MAX_PROXY_TIMEOUT: f64 = 3600.0;
/// Longest batched wait (1 s): past that the loop would hold echoes back for seconds.
pub const MAX_BATCH_WAIT_US: u32 = 1_000_000;
/// Largest `--max-added-latency-us`.
pub const MAX_ADDED_LATENCY_US: u32 = 10_000;
/// Default `--max-added-latency-us`: off, as measured (docs/BENCHMARKS.md, "2026-12-02: the
/// client's cost, and adaptive completion moderation").
pub const DEFAULT_MAX_ADDED_LATENCY_US: u32 = 0;

/// The checked settings that are not plain copies of the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Event-loop threads.
    pub threads: usize,
    /// CPUs to pin the threads to, in order (empty: unpinned).
    pub cpus: Vec<usize>,
    /// How long a graceful stop may take; `Duration::MAX` waits forever.
    pub shutdown_timeout: Duration,
    /// Idle timeout (None: off).
    pub idle_timeout: Option<Duration>,
    /// Write-stall timeout (None: off).
    pub write_timeout: Option<Duration>,
    /// What was rounded, one phrase each ("--buffers 3 rounded up to 4 (a power of two)").
    pub adjusted: Vec<String>,
    /// `--proxy-protocol`: who may send a header and how long it may take (None: off).
    pub proxy: Option<ProxyConfig>,
}

impl Settings {
    /// Checks every flag; rounds `args.buffers` and `args.cq_entries` in place.
    pub fn check(args: &mut Args) -> anyhow::Result<Settings> {
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        in_range("threads", threads, 1, MAX_THREADS)?;
        let cpus = match &args.cpus {
            Some(list) => super::args::parse_cpu_list(list)?,
            None => Vec::new(),
        };
        let mut adjusted = Vec::new();
        in_range("buf-size", args.buf_size, MIN_BUF_SIZE, MAX_BUF_SIZE)?;
        in_range("buffers", args.buffers, 1, MAX_BUFFERS)?;
        args.buffers = round_up_pow2("buffers", args.buffers, &mut adjusted);
        let pool = args.buffers as u64 * args.buf_size as u64;
        if pool > MAX_POOL_BYTES {
            bail!(
                "--buffers {} x --buf-size {} is {pool} bytes of buffers per thread; at most \
                 {MAX_POOL_BYTES} (4 GiB)",
                args.buffers,
                args.buf_size
            );
        }
        let cq_floor = if args.cq_entries_below_floor {
            1
        } else {
            MIN_CQ_ENTRIES
        };
        in_range("cq-entries", args.cq_entries, cq_floor, MAX_CQ_ENTRIES)?;
        args.cq_entries = round_up_pow2("cq-entries", args.cq_entries, &mut adjusted);
        in_range("max-pending", args.max_pending, 1, u32::MAX)?;
        in_range("batch-wait-us", args.batch_wait_us, 0, MAX_BATCH_WAIT_US)?;
        in_range(
            "max-added-latency-us",
            args.max_added_latency_us,
            0,
            MAX_ADDED_LATENCY_US,
        )?;
        if let Some(n) = args.max_connections {
            in_range("max-connections", n, 1, usize::MAX)?;
        }
        if let Some(n) = args.ring_table_size {
            in_range("ring-table-size", n, 4, 1 << 20)?;
        }
        if let Some(n) = args.max_connections_per_ip {
            in_range("max-connections-per-ip", n, 1, u32::MAX)?;
        }
        for (flag, v) in [
            ("udp-rate", args.udp_rate),
            ("udp-global-rate", args.udp_global_rate),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("--{flag} {v}: must be a positive number of datagrams per second");
            }
        }
        Ok(Settings {
            threads,
            cpus,
            shutdown_timeout: match seconds("shutdown-timeout", args.shutdown_timeout)? {
                Secs::Zero => Duration::ZERO,
                Secs::Finite(d) => d,
                Secs::Forever => Duration::MAX,
            },
            idle_timeout: seconds("idle-timeout", args.idle_timeout)?.into_timeout(),
            write_timeout: seconds("write-timeout", args.write_timeout)?.into_timeout(),
            adjusted,
            proxy: proxy(args)?,
        })
    }
}

/// `--proxy-protocol`, `--proxy-from` and `--proxy-timeout`, checked.
fn proxy(args: &Args) -> anyhow::Result<Option<ProxyConfig>> {
    let t = args.proxy_timeout;
    if !(t > 0.0 && t <= MAX_PROXY_TIMEOUT) {
        bail!("--proxy-timeout {t}: must be more than 0 and at most {MAX_PROXY_TIMEOUT} seconds");
    }
    if !args.proxy_protocol {
        return Ok(None);
    }
    let given: Vec<&str> = args.proxy_from.iter().map(String::as_str).collect();
    let list = if given.is_empty() {
        &DEFAULT_PROXY_FROM[..]
    } else {
        &given[..]
    };
    let mut from = Vec::new();
    for spec in list.iter().flat_map(|s| s.split(',')).map(str::trim) {
        let cidr: Cidr = spec
            .parse()
            .map_err(|e| anyhow::anyhow!("--proxy-from {spec}: {e} (e.g. 10.0.0.0/8 or ::1)"))?;
        if !from.contains(&cidr) {
            from.push(cidr);
        }
    }
    Ok(Some(ProxyConfig {
        from,
        timeout: Duration::from_secs_f64(t),
    }))
}

/// A number of seconds from the command line.
#[derive(Debug, PartialEq)]
enum Secs {
    Zero,
    Finite(Duration),
    /// Infinite, or too large for a `Duration` (about 5.8e11 years).
    Forever,
}

impl Secs {
    /// As an idle or write timeout: 0 and forever both mean "never".
    fn into_timeout(self) -> Option<Duration> {
        match self {
            Secs::Finite(d) => Some(d),
            Secs::Zero | Secs::Forever => None,
        }
    }
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Secs> {
    if v.is_nan() || v < 0.0 {
        bail!("--{flag} {v}: must be a number of seconds, 0 or more (inf: forever)");
    }
    if v == 0.0 {
        return Ok(Secs::Zero);
    }
    Ok(Duration::try_from_secs_f64(v).map_or(Secs::Forever, Secs::Finite))
}

fn in_range<T: PartialOrd + Display + Copy>(flag: &str, v: T, lo: T, hi: T) -> anyhow::Result<T> {
    if v < lo || v > hi {
        bail!("--{flag} {v}: must be {lo} to {hi}");
    }
    Ok(v)
}

fn round_up_pow2(flag: &str, v: u32, adjusted: &mut Vec<String>) -> u32 {
    let r = v.next_power_of_two();
    if r != v {
        adjusted.push(format!("--{flag} {v} rounded up to {r} (a power of two)"));
    }
    r
}

/// A duration for the start-up line: "10s", "off", "forever".
pub fn show(d: Option<Duration>) -> String {
    match d {
        None => "off".into(),
        Some(Duration::MAX) => "forever".into(),
        Some(d) => format!("{}s", d.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn check(flags: &[&str]) -> anyhow::Result<(Settings, Args)> {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(flags);
        let mut args = Cli::try_parse_from(argv).unwrap().args;
        Settings::check(&mut args).map(|s| (s, args))
    }

    fn error(flags: &[&str]) -> String {
        format!("{:#}", check(flags).unwrap_err())
    }

    #[test]
    fn what_cannot_work_names_the_flag_and_range() {
        for (flags, want) in [
            (&["--buffers", "0"][..], "--buffers 0: must be 1 to 32768"),
            (
                &["--buffers", "40000"],
                "--buffers 40000: must be 1 to 32768",
            ),
            (&["--buf-size", "0"], "--buf-size 0: must be 64 to 16777216"),
            (&["--buf-size", "1"], "--buf-size 1: must be 64 to 16777216"),
            (&["--max-pending", "0"], "--max-pending 0: must be 1 to"),
            (
                &["--cq-entries", "1"],
                "--cq-entries 1: must be 256 to 65536",
            ),
            (
                &["--cq-entries", "70000"],
                "--cq-entries 70000: must be 256",
            ),
            (&["--threads", "0"], "--threads 0: must be 1 to 1024"),
            (
                &["--max-connections", "0"],
                "--max-connections 0: must be 1",
            ),
            (
                &["--max-connections-per-ip", "0"],
                "--max-connections-per-ip 0",
            ),
            (&["--batch-wait-us", "5000000"], "--batch-wait-us 5000000"),
            (
                &["--max-added-latency-us", "20000"],
                "--max-added-latency-us 20000",
            ),
            (&["--shutdown-timeout=-1"], "--shutdown-timeout -1: must be"),
            (&["--idle-timeout", "NaN"], "--idle-timeout NaN: must be"),
            (&["--udp-rate", "0"], "--udp-rate 0: must be a positive"),
            (
                &["--proxy-protocol", "--proxy-from", "10.0.0.1/8"],
                "--proxy-from 10.0.0.1/8: bits after the prefix are set; the network is 10.0.0.0/8",
            ),
            (
                &["--proxy-protocol", "--proxy-from", "10.0.0.0/33"],
                "--proxy-from 10.0.0.0/33: the prefix length must be a number from 0 to 32",
            ),
            (
                &["--proxy-protocol", "--proxy-from", "lb.example"],
                "--proxy-from lb.example: not an IP address",
            ),
            (
                &["--proxy-protocol", "--proxy-timeout", "0"],
                "--proxy-timeout 0: must be more than 0 and at most 3600 seconds",
            ),
            (&["--proxy-timeout", "NaN"], "--proxy-timeout NaN: must be"),
        ] {
            let e = error(flags);
            assert!(e.contains(want), "{flags:?}: {e}");
            assert!(!e.contains('\n'), "{flags:?}: not one line: {e}");
        }
        let (_, a) = check(&["--cq-entries", "4", "--cq-entries-below-floor"]).unwrap();
        assert_eq!(a.cq_entries, 4, "the test-only override lifts the floor");
        let e = error(&["--buffers", "32768", "--buf-size", "16777216"]);
        assert!(e.contains("at most 4294967296"), "{e}");
    }

    #[test]
    fn proxy_from_defaults_to_loopback_and_takes_lists() {
        let (s, _) = check(&[]).unwrap();
        assert!(s.proxy.is_none(), "off unless asked");
        let (s, _) = check(&["--proxy-protocol"]).unwrap();
        let p = s.proxy.expect("on");
        let shown: Vec<String> = p.from.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["127.0.0.0/8", "::1/128"]);
        assert_eq!(p.timeout, Duration::from_secs(5));
        let (s, _) = check(&[
            "--proxy-protocol",
            "--proxy-from",
            "10.0.0.0/8",
            "192.0.2.7,2001:db8::/32",
            "--proxy-from",
            "10.0.0.0/8",
            "--proxy-timeout",
            "0.5",
        ])
        .unwrap();
        let p = s.proxy.unwrap();
        let shown: Vec<String> = p.from.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(p.timeout, Duration::from_millis(500));
    }

    #[test]
    fn what_can_be_rounded_is_rounded_and_said() {
        let (s, a) = check(&["--buffers", "3", "--cq-entries", "300"]).unwrap();
        assert_eq!((a.buffers, a.cq_entries), (4, 512));
        assert_eq!(
            s.adjusted,
            [
                "--buffers 3 rounded up to 4 (a power of two)",
                "--cq-entries 300 rounded up to 512 (a power of two)"
            ]
        );
        let (s, a) = check(&["--buffers", "2048"]).unwrap();
        assert_eq!(a.buffers, 2048);
        assert!(s.adjusted.is_empty(), "{:?}", s.adjusted);
    }

    #[test]
    fn huge_timeouts_mean_forever_and_never_panic() {
        for v in ["1e12", "1e18", "1e300", "inf"] {
            let (s, _) = check(&["--shutdown-timeout", v, "--idle-timeout", v]).unwrap();
            assert!(
                s.shutdown_timeout >= Duration::from_secs(1_000_000_000_000),
                "{v}"
            );
            if v != "1e12" && v != "1e18" {
                assert_eq!(s.shutdown_timeout, Duration::MAX, "{v}");
                assert_eq!(s.idle_timeout, None, "{v}");
            }
        }
        let (s, _) = check(&["--shutdown-timeout", "0", "--write-timeout", "0"]).unwrap();
        assert_eq!(
            (s.shutdown_timeout, s.write_timeout),
            (Duration::ZERO, None)
        );
        assert_eq!(show(Some(Duration::MAX)), "forever");
        assert_eq!(show(Some(Duration::from_millis(2500))), "2.5s");
    }
}
