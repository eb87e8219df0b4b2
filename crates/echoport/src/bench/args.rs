//! The command line of `echoport bench` and its validation into [`Params`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::serve::BackendChoice;

/// The default server address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7007";

/// Options of `echoport bench`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    echoport bench                                  # 50 connections, 64 B, closed loop, 10 s\n  \
    echoport bench -c 500 -s 512 -d 5s --cpus 1     # 500 connections pinned to CPU 1\n  \
    echoport bench -r 150k -d 5s --json             # open loop at 150,000 msgs/s\n  \
    echoport bench --sweep 10k,50k,100k --plot lat.svg\n  \
    echoport bench -a 127.0.0.1:7007 -c 50 -l 512 -t 10   # rust_echo_bench's flags\n\n\
    Exit status: 0 when every echo came back exact, 1 on any error (mismatch, short or\n\
    extra echo, connection lost or refused, timeout), 130 when interrupted (Ctrl-C).")]
pub struct Args {
    /// Server address, HOST:PORT.
    #[arg(value_name = "ADDR")]
    pub addr: Option<String>,

    /// Server address (rust_echo_bench's `-a`), instead of ADDR.
    #[arg(
        short = 'a',
        long = "address",
        value_name = "ADDR",
        conflicts_with = "addr"
    )]
    pub address: Option<String>,

    /// Connections, spread evenly over the threads.
    #[arg(short = 'c', long, value_name = "N", default_value_t = 50)]
    pub connections: usize,

    /// Event-loop threads, each with its own backend instance. Default: the number of CPUs
    /// (or of --cpus), at most one per connection.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Pin the threads to these CPUs, in order (e.g. "1", "2,3", "0-3").
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,

    /// I/O backend of the load generator.
    #[arg(long, value_enum, default_value_t = BackendChoice::IoUring)]
    pub backend: BackendChoice,

    /// Open at most this many connections per second (e.g. 500, 2k); default: at once.
    #[arg(long, value_name = "PER_SEC", value_parser = parse_rate)]
    pub connect_rate: Option<f64>,

    /// Local source addresses, a list or range (127.0.0.2-127.0.0.9,::1): connection i binds
    /// to address i mod N before connecting (with IP_BIND_ADDRESS_NO_PORT), to go past the
    /// ~28,000 ephemeral ports of one address pair.
    #[arg(long, value_name = "LIST")]
    pub source: Option<String>,

    /// Message size in bytes, or MIN-MAX for sizes drawn uniformly per message
    /// (rust_echo_bench's `-l`).
    #[arg(short = 's', long, visible_short_alias = 'l', alias = "length", value_name = "BYTES|MIN-MAX", default_value = "64", value_parser = parse_size)]
    pub size: SizeRange,

    /// Measured time (e.g. 10, 10s, 500ms, 2m), after the warm-up (rust_echo_bench's `-t`).
    #[arg(short = 'd', long, visible_short_alias = 't', value_name = "TIME", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Time before measuring starts: connections open and messages flow, but nothing is
    /// counted except errors.
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Measure this many messages (in total, after the warm-up) instead of a duration.
    #[arg(short = 'n', long, value_name = "N", value_parser = parse_count)]
    pub count: Option<u64>,

    /// Closed loop: messages each connection keeps in flight.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub pipeline: u32,

    /// Open loop: messages per second in total (e.g. 150000, 150k, 1.5M), sent at fixed
    /// intended times; latency counts from the intended time (no coordinated omission).
    #[arg(short = 'r', long, value_name = "PER_SEC", value_parser = parse_rate, conflicts_with = "pipeline")]
    pub rate: Option<f64>,

    /// Open loop at each of these rates in turn (e.g. 10k,50k,100k): a latency-versus-load
    /// curve.
    #[arg(long, value_name = "RATES", value_delimiter = ',', value_parser = parse_rate, conflicts_with_all = ["rate", "pipeline"])]
    pub sweep: Option<Vec<f64>>,

    /// Open loop: sleep at least this long on the timer (e.g. 50us). Messages falling due
    /// meanwhile go out with the next echo or tick, so the client wakes up less often (less
    /// CPU per echo at high rates); their latency still counts from the intended time, so
    /// the wait shows in the results (pessimistic, never flattering). Default: wake for
    /// each message on time.
    #[arg(long, value_name = "TIME", default_value = "0", value_parser = parse_duration)]
    pub tick: Duration,

    /// Open loop: when the next message is due within this long, poll for it instead of
    /// sleeping on a timer. A timer costs a kernel round trip (on a virtual machine tens of
    /// microseconds of exits), so at high rates polling is both cheaper and on time; the
    /// client then uses its whole core. 0 = always sleep on the timer.
    #[arg(long, value_name = "TIME", default_value = "0", value_parser = parse_duration)]
    pub spin: Duration,

    /// A connection with echoes owed and no byte back for this long counts as timed out;
    /// also how long the end of a run waits for the last echoes.
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print the results as JSON on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Write the latency percentile distribution (HdrHistogram .hgrm, microseconds) here;
    /// a sweep writes one file per rate, with the rate in the name.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,

    /// Write an SVG plot here: the latency percentile distribution, or for a sweep latency
    /// versus load.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Also measure this process's CPU time (the server's) over the measured window and
    /// report its CPU per echo next to the client's.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// No live progress line, even on a terminal.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// A message size, fixed (`min == max`) or drawn per message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SizeRange {
    /// Smallest size in bytes (at least 1).
    pub min: u32,
    /// Largest size in bytes.
    pub max: u32,
}

impl SizeRange {
    /// The size of the message whose content key is `key` (a hash: uniform enough).
    pub fn pick(&self, key: u64) -> u32 {
        if self.min == self.max {
            self.min
        } else {
            let span = (self.max - self.min) as u64 + 1;
            self.min + ((key >> 16) % span) as u32
        }
    }
}

impl std::fmt::Display for SizeRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{} B", self.min)
        } else {
            write!(f, "{}-{} B", self.min, self.max)
        }
    }
}

/// Closed or open loop.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Load {
    /// Each connection keeps this many messages in flight.
    Closed {
        /// Messages in flight per connection.
        pipeline: u32,
    },
    /// Messages per second in total, at fixed intended times.
    Open {
        /// Messages per second.
        rate: f64,
    },
}

/// Everything a run needs, validated.
#[derive(Clone, Debug)]
pub struct Params {
    /// Where the server listens.
    pub server: SocketAddr,
    /// Connections in total.
    pub connections: usize,
    /// Event-loop threads.
    pub threads: usize,
    /// CPUs to pin the threads to (empty: no pinning).
    pub cpus: Vec<usize>,
    /// Backend choice.
    pub backend: BackendChoice,
    /// Connections per second while opening (None: as fast as possible).
    pub connect_rate: Option<f64>,
    /// Source addresses to bind to (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// Message sizes.
    pub size: SizeRange,
    /// Measured duration (unless `count` is given).
    pub duration: Duration,
    /// Warm-up before measuring.
    pub warmup: Duration,
    /// Messages to measure instead of a duration.
    pub count: Option<u64>,
    /// The load of a single run; a sweep overrides the rate per run.
    pub load: Load,
    /// Rates of a sweep (empty: one run).
    pub sweep: Vec<f64>,
    /// No-progress timeout and end-of-run grace.
    pub timeout: Duration,
    /// Open loop: shortest sleep on the timer alone.
    pub tick: Duration,
    /// Open loop: poll instead of sleeping when the next message is due this soon.
    pub spin: Duration,
}

impl Params {
    /// Checks the arguments and resolves the address.
    pub fn from_args(a: &Args) -> anyhow::Result<Params> {
        let spec = a
            .address
            .as_deref()
            .or(a.addr.as_deref())
            .unwrap_or(DEFAULT_ADDR);
        let server = spec
            .to_socket_addrs()
            .with_context(|| {
                format!("bad server address {spec:?} (expected HOST:PORT, e.g. 127.0.0.1:7007)")
            })?
            .next()
            .with_context(|| format!("server address {spec:?} resolves to nothing"))?;
        if a.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if a.connections > (1 << 24) {
            bail!("--connections is limited to 16,777,216");
        }
        let cpus = match &a.cpus {
            Some(list) => crate::serve::parse_cpu_list(list)?,
            None => Vec::new(),
        };
        let threads = match a.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(t) => t,
            None if !cpus.is_empty() => cpus.len(),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
        .min(a.connections);
        if a.pipeline == 0 {
            bail!("--pipeline must be at least 1");
        }
        let sources = match &a.source {
            Some(s) => parse_sources(s)?,
            None => Vec::new(),
        };
        if let Some(bad) = sources.iter().find(|s| s.is_ipv4() != server.is_ipv4()) {
            bail!("source address {bad} is not of the server address's family ({server})");
        }
        if a.count == Some(0) {
            bail!("--count must be at least 1");
        }
        if a.count.is_none() && a.duration.is_zero() {
            bail!("--duration must be more than 0");
        }
        if a.timeout.is_zero() {
            bail!("--timeout must be more than 0");
        }
        let load = match a.rate {
            Some(rate) => Load::Open { rate },
            None => Load::Closed {
                pipeline: a.pipeline,
            },
        };
        let sweep = a.sweep.clone().unwrap_or_default();
        Ok(Params {
            server,
            connections: a.connections,
            threads,
            cpus,
            backend: a.backend,
            connect_rate: a.connect_rate,
            sources,
            size: a.size,
            duration: a.duration,
            warmup: a.warmup,
            count: a.count,
            load,
            sweep,
            timeout: a.timeout,
            tick: a.tick,
            spin: a.spin,
        })
    }

    /// The loads to run in turn: one, or one per sweep rate.
    pub fn loads(&self) -> Vec<Load> {
        if self.sweep.is_empty() {
            vec![self.load]
        } else {
            self.sweep.iter().map(|&rate| Load::Open { rate }).collect()
        }
    }
}

/// Parses "64" or "64-512".
pub fn parse_size(s: &str) -> Result<SizeRange, String> {
    let one = |v: &str| -> Result<u32, String> {
        let v = v.trim();
        let n: u64 = parse_scaled(v, 1024.0)
            .filter(|n| n.fract() == 0.0 && *n >= 1.0 && *n <= (1u64 << 30) as f64)
            .ok_or_else(|| format!("bad size {v:?} (bytes from 1 to 1G, e.g. 64, 4k)"))?
            as u64;
        Ok(n as u32)
    };
    let (min, max) = match s.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => {
            let v = one(s)?;
            (v, v)
        }
    };
    if min > max {
        return Err(format!("bad size range {s:?} (MIN above MAX)"));
    }
    Ok(SizeRange { min, max })
}

/// Parses "10", "10s", "1.5s", "500ms", "250us", "2m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("bad time {s:?} (e.g. 10, 10s, 500ms, 2m)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=86400.0 * 365.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses "2000", "150k", "1.5M" (per second).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    parse_scaled(s.trim(), 1000.0)
        .filter(|v| v.is_finite() && *v > 0.0 && *v <= 1e9)
        .ok_or_else(|| format!("bad rate {s:?} (per second, e.g. 2000, 150k, 1.5M)"))
}

fn parse_count(s: &str) -> Result<u64, String> {
    parse_scaled(s.trim(), 1000.0)
        .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v < 1e15)
        .map(|v| v as u64)
        .ok_or_else(|| format!("bad count {s:?} (e.g. 100000, 100k)"))
}

/// A number with an optional k/M/G suffix of `base`.
fn parse_scaled(s: &str, base: f64) -> Option<f64> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], base),
        'm' | 'M' => (&s[..s.len() - 1], base * base),
        'g' | 'G' => (&s[..s.len() - 1], base * base * base),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().ok()?;
    Some(v * mult)
}

/// Parses "127.0.0.2", "127.0.0.2-127.0.0.9", "::1", or a comma list of them.
pub fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad source address {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad source address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if a > b || b - a >= 65536 {
                bail!("bad source range {part:?} (first to last, at most 65,536 addresses)");
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(
                part.parse()
                    .with_context(|| format!("bad source address {part:?}"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("--source names no address");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64").unwrap(), SizeRange { min: 64, max: 64 });
        assert_eq!(
            parse_size("64-4k").unwrap(),
            SizeRange { min: 64, max: 4096 }
        );
        assert!(parse_size("0").is_err());
        assert!(parse_size("9-3").is_err());
        assert!(parse_size("x").is_err());
        let r = SizeRange { min: 10, max: 12 };
        let seen: std::collections::BTreeSet<u32> = (0..1000u64).map(|k| r.pick(k << 16)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![10, 11, 12]);
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_rate("150k").unwrap(), 150_000.0);
        assert_eq!(parse_rate("1.5M").unwrap(), 1_500_000.0);
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_count("100k").unwrap(), 100_000);
    }

    #[test]
    fn source_lists() {
        let v = parse_sources("127.0.0.2-127.0.0.4, 127.0.0.9").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[2], "127.0.0.4".parse::<IpAddr>().unwrap());
        assert_eq!(v[3], "127.0.0.9".parse::<IpAddr>().unwrap());
        assert!(parse_sources("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_sources(",").is_err());
    }
}
