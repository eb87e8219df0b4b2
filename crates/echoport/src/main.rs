//! `echoport`: a completion-based TCP echo server, its test client and its load generator.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(not(windows))]
mod backends;
#[cfg(windows)]
#[path = "backends_windows.rs"]
mod backends;
#[cfg(unix)]
mod bench;
// The load generator is Linux-only for now; on Windows `bench` only says so.
#[cfg(not(unix))]
#[path = "bench_unsupported.rs"]
mod bench;
mod client;
mod logging;
mod metrics;
mod serve;
#[cfg(unix)]
mod systemd;
mod threads;
mod udp;

/// A completion-based TCP echo server (io_uring, epoll or IOCP), its test client, and a
/// load generator that checks every byte and tells the truth about latency.
#[derive(Parser, Debug)]
#[command(name = "echoport", version, propagate_version = true)]
struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list
    /// (RUST_LOG is used when this is not given).
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,

    /// Log line format on stderr: `text` (for people) or `json` (one JSON object a line,
    /// {"timestamp", "level", "message", fields...}, for log collectors).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the echo server (loopback only unless told otherwise).
    Serve(serve::Args),
    /// Send lines to an echo server and print what comes back, with round-trip times.
    Client(client::Args),
    /// Load-test an echo server: throughput, latency percentiles, byte-exact verification
    /// (Linux only for now).
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log.as_deref(), cli.log_format);
    let result = match cli.cmd {
        Cmd::Serve(args) => serve::run(args),
        Cmd::Client(args) => client::run(args),
        Cmd::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            logging::print_error(cli.log_format, &e);
            ExitCode::from(1)
        }
    }
}
