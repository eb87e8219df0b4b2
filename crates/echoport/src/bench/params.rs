//! The validated parameters of a run ([`Params`]), checked from the command line's [`Args`].

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};

use echoport_core::proxy::Cidr;

use super::args::{Args, CloseMode, DEFAULT_ADDR, ProxyVersion};
use super::parse::parse_sources;
use crate::serve::BackendChoice;

/// The open loop's tick over TCP unless `--tick` says otherwise: one wake-up per 100 µs costs
/// the client a tenth of a timer per echo at 100,000 msgs/s and sends 10 messages per tick.
pub const DEFAULT_TICK: Duration = Duration::from_micros(100);

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
    /// When to begin (Unix seconds), from --start-at or --start-in.
    pub start_at: Option<f64>,
    /// This process's name in the results.
    pub tag: Option<String>,
    /// Length of the intervals measurements are cut into (None: not cut).
    pub interval: Option<Duration>,
    /// Keep every measured latency (the hidden --raw-samples).
    pub keep_samples: bool,
    /// Churn: echoes per connection before it is replaced.
    pub messages_per_conn: Option<u64>,
    /// How connections are closed.
    pub close: CloseMode,
    /// Server-closed connections are replaced, not errors.
    pub reconnect: bool,
    /// Load a UDP echo service.
    pub udp: bool,
    /// Hold the connections as io_uring direct descriptors (more than RLIMIT_NOFILE:
    /// [`super::descriptors`]).
    pub direct: bool,
    /// Begin each connection with a PROXY header of this version, naming clients from this
    /// network (None: no header).
    pub proxy: Option<(ProxyVersion, Cidr)>,
}

impl Params {
    /// Checks the arguments and resolves the address.
    pub fn from_args(a: &Args) -> anyhow::Result<Params> {
        let server = server_addr(a)?;
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
            tick: a.tick.unwrap_or(if a.udp || !a.spin.is_zero() {
                Duration::ZERO
            } else {
                DEFAULT_TICK
            }),
            spin: a.spin,
            start_at: start_at(a),
            tag: tag(a)?,
            interval: interval(a)?,
            keep_samples: a.raw_samples.is_some(),
            messages_per_conn: messages_per_conn(a)?,
            close: a.close,
            reconnect: a.reconnect,
            udp: udp(a)?,
            direct: false,
            proxy: proxy(a)?,
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

/// The start time asked for, in Unix seconds.
fn start_at(a: &Args) -> Option<f64> {
    a.start_at
        .or_else(|| a.start_in.map(|d| super::unix_now() + d.as_secs_f64()))
}

fn tag(a: &Args) -> anyhow::Result<Option<String>> {
    match &a.tag {
        Some(t) if !super::hdr::valid_tag(t) => {
            bail!("--tag {t:?}: a tag is a non-empty name without spaces or commas")
        }
        t => Ok(t.clone()),
    }
}

/// Intervals: as asked, or one second for the interval files.
fn interval(a: &Args) -> anyhow::Result<Option<Duration>> {
    if let Some(d) = a.interval {
        if d < Duration::from_millis(10) {
            bail!("--interval must be at least 10ms");
        }
        return Ok(Some(d));
    }
    let files = a.hlog.is_some() || a.interval_json.is_some();
    Ok(files.then_some(Duration::from_secs(1)))
}

fn messages_per_conn(a: &Args) -> anyhow::Result<Option<u64>> {
    match a.messages_per_conn {
        Some(0) => bail!("--messages-per-conn must be at least 1"),
        Some(k) if k < a.pipeline as u64 => bail!(
            "--messages-per-conn {k} is less than --pipeline {}: a connection could not fill its pipeline",
            a.pipeline
        ),
        k => Ok(k),
    }
}

/// `--proxy-protocol` and `--proxy-src`, checked.
fn proxy(a: &Args) -> anyhow::Result<Option<(ProxyVersion, Cidr)>> {
    let Some(version) = a.proxy_protocol else {
        return Ok(None);
    };
    let spec = a.proxy_src.as_deref().unwrap_or(DEFAULT_PROXY_SRC);
    let cidr = spec
        .parse::<Cidr>()
        .map_err(|e| anyhow::anyhow!("--proxy-src {spec}: {e} (e.g. 198.51.100.0/24)"))?;
    Ok(Some((version, cidr)))
}

/// The clients PROXY headers name when `--proxy-src` is not given (TEST-NET-1).
pub const DEFAULT_PROXY_SRC: &str = "192.0.2.0/24";

/// The server's address: ADDR, `-a`, or the default.
fn server_addr(a: &Args) -> anyhow::Result<SocketAddr> {
    let spec = a
        .address
        .as_deref()
        .or(a.addr.as_deref())
        .unwrap_or(DEFAULT_ADDR);
    spec.to_socket_addrs()
        .with_context(|| {
            format!("bad server address {spec:?} (expected HOST:PORT, e.g. 127.0.0.1:7007)")
        })?
        .next()
        .with_context(|| format!("server address {spec:?} resolves to nothing"))
}

fn udp(a: &Args) -> anyhow::Result<bool> {
    if !a.udp {
        return Ok(false);
    }
    let tcp_only = [
        (a.messages_per_conn.is_some(), "--messages-per-conn"),
        (a.reconnect, "--reconnect"),
        (a.close != CloseMode::Fin, "--close"),
        (a.connect_rate.is_some(), "--connect-rate"),
    ];
    if let Some((_, flag)) = tcp_only.iter().find(|(given, _)| *given) {
        bail!("{flag} is for TCP connections; --udp has no connections to open or close");
    }
    let max = super::udp::MAX_DATAGRAM;
    if a.size.min < 8 || a.size.max > max {
        bail!(
            "--udp needs --size from 8 bytes (each datagram carries its sequence number) to {max} (the largest datagram)"
        );
    }
    Ok(true)
}
