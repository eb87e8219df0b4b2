//! The command line of `echoport bench`, grouped under headings in `--help`; validated into
//! [`super::params::Params`].

use std::path::PathBuf;
use std::time::Duration;

use super::merge::MergeArgs;
use super::params::SizeRange;
use super::parse::{parse_count, parse_duration, parse_rate, parse_size, parse_time};
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
    Several processes (or hosts), one exact answer:\n  \
    echoport bench HOST:7007 -r 50k --start-at 2026-12-01T10:00:00Z --json > host1.json\n  \
    echoport bench merge host*.json --svg all.svg   # percentiles of the merged histogram\n\n\
    Exit status: 0 when every echo came back exact, 1 on any error (mismatch, short or\n\
    extra echo, connection lost or refused, timeout), 130 when interrupted (Ctrl-C).")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// Other things `bench` does than load a server.
    #[command(subcommand)]
    pub cmd: Option<Box<Cmd>>,

    /// Everything else (boxed: the options are many, the command enum stays small).
    #[command(flatten)]
    pub opts: Box<Opts>,
}

impl std::ops::Deref for Args {
    type Target = Opts;

    fn deref(&self) -> &Opts {
        &self.opts
    }
}

/// The options of a load run.
#[derive(clap::Args, Debug)]
pub struct Opts {
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

    /// Connections, spread evenly over the threads. More than this process may open
    /// (RLIMIT_NOFILE, raised to its hard limit) are held as io_uring direct descriptors,
    /// which take no slot of the descriptor table (then `--tick` is off: its receive stamps
    /// are read from plain descriptors). Beyond ~28,000 per source address, give --source.
    #[arg(
        help_heading = "Connections",
        short = 'c',
        long,
        value_name = "N",
        default_value_t = 50
    )]
    pub connections: usize,

    /// Event-loop threads, each with its own backend instance. Default: the number of CPUs
    /// (or of --cpus), at most one per connection.
    #[arg(help_heading = "Connections", long, value_name = "N")]
    pub threads: Option<usize>,

    /// Pin the threads to these CPUs, in order (e.g. "1", "2,3", "0-3").
    #[arg(help_heading = "Connections", long, value_name = "LIST")]
    pub cpus: Option<String>,

    /// I/O backend of the load generator.
    #[arg(help_heading = "Connections", long, value_enum, default_value_t = BackendChoice::IoUring)]
    pub backend: BackendChoice,

    /// Open at most this many connections per second (e.g. 500, 2k); default: at once.
    #[arg(help_heading = "Connections", long, value_name = "PER_SEC", value_parser = parse_rate)]
    pub connect_rate: Option<f64>,

    /// Local source addresses, a list or range (127.0.0.2-127.0.0.9,::1): connection i binds
    /// to address i mod N before connecting (with IP_BIND_ADDRESS_NO_PORT), to go past the
    /// ~28,000 ephemeral ports of one address pair.
    #[arg(help_heading = "Connections", long, value_name = "LIST")]
    pub source: Option<String>,

    /// Begin every connection with a PROXY protocol header, as a load balancer would, for a
    /// server started with --proxy-protocol (to load-test its per-client limits without a
    /// balancer): `v1` (text) or `v2` (binary). The header names a client from --proxy-src;
    /// it is written once per connection (reconnects included), is not counted as sent,
    /// and is never expected back.
    #[arg(
        help_heading = "Connections",
        long,
        value_enum,
        value_name = "VERSION",
        conflicts_with = "udp"
    )]
    pub proxy_protocol: Option<ProxyVersion>,

    /// With --proxy-protocol: the clients the headers name, a network or one address
    /// (198.51.100.0/24, 2001:db8::/64): the n-th connection opened names the n-th address,
    /// wrapping round, and port 1024 + the number of wraps (so every client is new).
    /// Default: 192.0.2.0/24.
    #[arg(
        help_heading = "Connections",
        long,
        value_name = "CIDR",
        requires = "proxy_protocol"
    )]
    pub proxy_src: Option<String>,

    /// Message size in bytes, or MIN-MAX for sizes drawn uniformly per message
    /// (rust_echo_bench's `-l`).
    #[arg(help_heading = "Load", short = 's', long, visible_short_alias = 'l', alias = "length", value_name = "BYTES|MIN-MAX", default_value = "64", value_parser = parse_size)]
    pub size: SizeRange,

    /// Measured time (e.g. 10, 10s, 500ms, 2m), after the warm-up (rust_echo_bench's `-t`).
    #[arg(help_heading = "Load", short = 'd', long, visible_short_alias = 't', value_name = "TIME", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Time before measuring starts: connections open and messages flow, but nothing is
    /// counted except errors.
    #[arg(help_heading = "Load", long, value_name = "TIME", default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Measure this many messages (in total, after the warm-up) instead of a duration.
    #[arg(help_heading = "Load", short = 'n', long, value_name = "N", value_parser = parse_count)]
    pub count: Option<u64>,

    /// Closed loop: messages each connection keeps in flight.
    #[arg(help_heading = "Load", long, value_name = "K", default_value_t = 1)]
    pub pipeline: u32,

    /// Open loop: messages per second in total (e.g. 150000, 150k, 1.5M), sent at fixed
    /// intended times; latency counts from the intended time (no coordinated omission).
    #[arg(help_heading = "Load", short = 'r', long, value_name = "PER_SEC", value_parser = parse_rate, conflicts_with = "pipeline")]
    pub rate: Option<f64>,

    /// Open loop at each of these rates in turn (e.g. 10k,50k,100k): a latency-versus-load
    /// curve.
    #[arg(help_heading = "Load", long, value_name = "RATES", value_delimiter = ',', value_parser = parse_rate, conflicts_with_all = ["rate", "pipeline"])]
    pub sweep: Option<Vec<f64>>,

    /// Open loop: work in ticks of this length (e.g. 50us). Each message goes out at the
    /// first tick at or after its intended time, together with the tick's other messages
    /// (one submission), and its latency counts from that tick; between ticks the client
    /// sleeps on a timer and is not woken by echoes, so it wakes once per tick, not once per
    /// message. Echoes are timed by the kernel's arrival stamp, so the tick does not show
    /// in their latency. Default 100us; 0 = wake for each message on time (the default, too,
    /// when the connections are more than RLIMIT_NOFILE: see -c). (UDP: the shortest sleep
    /// on the timer; default 0.)
    #[arg(help_heading = "Tuning and measurement", long, value_name = "TIME", value_parser = parse_duration)]
    pub tick: Option<Duration>,

    /// Open loop: when the next message is due within this long, poll for it instead of
    /// sleeping on a timer. A timer costs a kernel round trip (on a virtual machine tens of
    /// microseconds of exits), so at high rates polling is both cheaper and on time; the
    /// client then uses its whole core. 0 = always sleep on the timer. Applies to the
    /// per-message loop (`--tick 0`, the default when --spin is given).
    #[arg(help_heading = "Tuning and measurement", long, value_name = "TIME", default_value = "0", value_parser = parse_duration)]
    pub spin: Duration,

    /// A connection with echoes owed and no byte back for this long counts as timed out;
    /// also how long the end of a run waits for the last echoes.
    #[arg(help_heading = "Load", long, value_name = "TIME", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Close each connection after this many echoes and open a new one in its place
    /// (connection churn: accept rate, connect latency, time to the first echo). With -r the
    /// open loop paces the messages, so this paces the reconnects too.
    #[arg(help_heading = "Connection churn", long, value_name = "K", value_parser = parse_count)]
    pub messages_per_conn: Option<u64>,

    /// How the client closes connections: fin (an orderly close) or rst (SO_LINGER 0, a
    /// reset: no TIME_WAIT left behind on the client).
    #[arg(help_heading = "Connection churn", long, value_enum, default_value_t = CloseMode::Fin)]
    pub close: CloseMode,

    /// Count a connection the server closes (or resets) as a reconnect, not an error, and
    /// open a new one in its place (for rolling restarts); a failed reconnect is retried
    /// until --timeout has passed. Echoes it still owed are reported as abandoned.
    #[arg(help_heading = "Connection churn", long)]
    pub reconnect: bool,

    /// Load a UDP echo service (echoport serve --udp, RFC 862) instead of TCP: each
    /// connection is a UDP flow (its own socket and source port), each datagram one message
    /// (--size from 8 bytes, its sequence number, to 65507). Reports loss, duplicates,
    /// reordering and late arrivals; a datagram not back within --timeout is lost. Mind the
    /// server's per-source and global rate limits (serve --udp-rate, --udp-global-rate).
    #[arg(help_heading = "UDP", long)]
    pub udp: bool,

    /// Sleep until this wall-clock time, then connect and run: RFC 3339
    /// (2026-12-01T10:00:00Z, or with an offset like +01:00) or Unix seconds. Give every
    /// process of a distributed run the same time (their clocks synchronised, e.g. by NTP)
    /// so their measured windows line up.
    #[arg(help_heading = "Starting together", long, value_name = "TIME", value_parser = parse_time)]
    pub start_at: Option<f64>,

    /// Sleep this long (e.g. 30s), then connect and run; the same as --start-at now + TIME.
    #[arg(help_heading = "Starting together", long, value_name = "TIME", value_parser = parse_duration, conflicts_with = "start_at")]
    pub start_in: Option<Duration>,

    /// Print the results as JSON on stdout (the human summary goes to stderr).
    #[arg(help_heading = "Output", long)]
    pub json: bool,

    /// Write the latency percentile distribution (HdrHistogram .hgrm, microseconds) here;
    /// a sweep writes one file per rate, with the rate in the name.
    #[arg(help_heading = "Output", long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,

    /// Write an SVG plot here: the latency percentile distribution, or for a sweep latency
    /// versus load.
    #[arg(help_heading = "Output", long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Print a line per interval of this length (e.g. 1s, 500ms) on stderr, counted from the
    /// end of the warm-up: throughput and p50/p99/p99.9/max of the echoes completed in it, so
    /// stalls show where they happened. Also the length of --hlog and --interval-json
    /// intervals.
    #[arg(help_heading = "Output", long, value_name = "TIME", value_parser = parse_duration)]
    pub interval: Option<Duration>,

    /// Write each interval as a JSON line here (per second unless --interval says otherwise):
    /// start time, messages, throughput, percentiles.
    #[arg(help_heading = "Output", long, value_name = "FILE")]
    pub interval_json: Option<PathBuf>,

    /// Write an HdrHistogram interval log (.hlog) here: one histogram per interval (per
    /// second unless --interval says otherwise), lossless, readable by HdrHistogram's
    /// HistogramLogProcessor and plotters.
    #[arg(help_heading = "Output", long, value_name = "FILE.hlog")]
    pub hlog: Option<PathBuf>,

    /// A name for this process's results (no spaces or commas), e.g. the host: written as
    /// `tag` in the JSON and `Tag=` in the interval log, and shown by `bench merge`.
    #[arg(help_heading = "Output", long, value_name = "NAME")]
    pub tag: Option<String>,

    /// Also measure this process's CPU time (the server's) over the measured window and
    /// report its CPU per echo next to the client's.
    #[arg(help_heading = "Tuning and measurement", long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// No live progress line, even on a terminal.
    #[arg(help_heading = "Output", short = 'q', long)]
    pub quiet: bool,

    /// Tests only: write every measured latency (ns, one a line) here.
    #[arg(long, value_name = "FILE", hide = true)]
    pub raw_samples: Option<PathBuf>,
}

/// Which PROXY protocol header a connection begins with (see `--proxy-protocol`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// How the client closes a connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CloseMode {
    /// An orderly close (FIN).
    Fin,
    /// A reset (SO_LINGER 0).
    Rst,
}

/// Subcommands of `echoport bench`.
#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Combine the JSON results of several bench runs (processes, hosts) into one report:
    /// counts are exact sums, percentiles come from the merged histograms.
    Merge(MergeArgs),
}
