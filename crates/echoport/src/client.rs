//! `echoport client`: the original's small test client, made strict.
//!
//! It connects, sends each line (from standard input, or `--message` repeated `--count`
//! times), reads back exactly as many bytes as it sent, and prints them with the round-trip
//! time. Anything other than a byte-exact echo is an error: different bytes, the connection
//! ending early, or no answer within the timeout. After the last line it shuts down its
//! sending side and expects the server to close (an echo server that gets end-of-stream
//! echoes what it has and closes); bytes arriving after the last echo are an error too.

use std::io::{self, BufRead, ErrorKind, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Lines longer than this are written from a second thread while the echo is read, so that
/// a line larger than the sockets' buffers cannot deadlock client and server.
const WRITE_INLINE_MAX: usize = 64 * 1024;

/// Options of `echoport client`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each line is sent with its newline; the echo is printed without it, \
    followed by a tab and the round-trip time. A summary goes to stderr.\n\n\
    Exit status: 0 when every echo matched byte for byte; 1 when the connection failed, \
    an echo differed, the connection ended early, or an echo did not come within --timeout.\n\n\
    Examples:\n  \
    echoport client                                  # type lines, Ctrl-D to end\n  \
    echoport client 127.0.0.1:7007 -m hello -n 5     # five round trips\n  \
    printf 'a\\nb\\n' | echoport client '[::1]:7007'"
)]
pub struct Args {
    /// Server address, HOST:PORT (e.g. 127.0.0.1:7007, [::1]:7007, localhost:7007).
    #[arg(value_name = "ADDR", default_value = "127.0.0.1:7007")]
    pub addr: String,

    /// Send this text (plus a newline) instead of reading lines from standard input.
    #[arg(short, long, value_name = "TEXT")]
    pub message: Option<String>,

    /// How many times to send --message.
    #[arg(
        short = 'n',
        long,
        value_name = "N",
        default_value_t = 1,
        requires = "message"
    )]
    pub count: u64,

    /// Seconds to wait for the connection and for each echo before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub timeout: f64,
}

/// Runs the client; `Ok` only when every echo matched.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a number of seconds > 0");
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut stream = connect(&args.addr, timeout)?;
    let peer = stream.peer_addr().ok();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let stdin = io::stdin();
    if args.message.is_none() && stdin.is_terminal() {
        eprintln!(
            "connected to {}; type lines, Ctrl-D to end",
            peer.map_or(args.addr.clone(), |p| p.to_string())
        );
    }
    let lines: Box<dyn Iterator<Item = io::Result<Vec<u8>>>> = match &args.message {
        Some(text) => {
            let mut line = text.clone().into_bytes();
            line.push(b'\n');
            Box::new((0..args.count).map(move |_| Ok(line.clone())))
        }
        None => Box::new(StdinLines(stdin.lock())),
    };

    let out = io::stdout();
    let mut out = out.lock();
    let mut rtts = Vec::new();
    let mut echo = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.context("reading standard input")?;
        let n = i + 1;
        let started = Instant::now();
        round_trip(&mut stream, &line, &mut echo).with_context(|| format!("line {n}"))?;
        let rtt = started.elapsed();
        rtts.push(rtt);
        let text = echo.strip_suffix(b"\n").unwrap_or(&echo);
        out.write_all(text)?;
        writeln!(out, "\t{}", fmt_duration(rtt))?;
        out.flush()?;
    }

    // End of input: say so, and expect nothing more than the server's close.
    let _ = stream.shutdown(Shutdown::Write);
    let mut extra = [0u8; 4096];
    match stream.read(&mut extra) {
        Ok(0) => {}
        Ok(k) => bail!(
            "the server sent {k} unexpected byte(s) after the last echo: {}",
            show(&extra[..k.min(64)])
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            eprintln!(
                "note: the server did not close the connection within {} after end of input",
                fmt_duration(timeout)
            );
        }
        // A reset after every echo arrived loses nothing the user asked for.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e).context("waiting for the server to close"),
    }
    summary(&rtts);
    Ok(ExitCode::SUCCESS)
}

/// Sends `line` and reads back exactly as many bytes into `echo`, failing unless they match.
fn round_trip(stream: &mut TcpStream, line: &[u8], echo: &mut Vec<u8>) -> anyhow::Result<()> {
    echo.clear();
    echo.resize(line.len(), 0);
    if line.len() <= WRITE_INLINE_MAX {
        stream.write_all(line).context("sending")?;
        read_echo(stream, line, echo)
    } else {
        let mut writer = stream.try_clone().context("cloning the socket")?;
        std::thread::scope(|s| {
            let w = s.spawn(move || writer.write_all(line));
            let r = read_echo(stream, line, echo);
            let w = w.join().expect("the writer thread does not panic");
            // A read error explains a write error (a reset), not the other way round.
            r?;
            w.context("sending")
        })
    }
}

fn read_echo(stream: &mut TcpStream, line: &[u8], echo: &mut [u8]) -> anyhow::Result<()> {
    let mut got = 0;
    while got < line.len() {
        match stream.read(&mut echo[got..]) {
            Ok(0) => bail!(
                "the server closed the connection after echoing {got} of {} bytes",
                line.len()
            ),
            Ok(k) => {
                if let Some(i) = (got..got + k).find(|&i| echo[i] != line[i]) {
                    let (from, to) = (i.saturating_sub(16), (i + 16).min(got + k));
                    bail!(
                        "the echo differs from what was sent at byte {i}: sent {}, got {}",
                        show(&line[from..to]),
                        show(&echo[from..to])
                    );
                }
                got += k;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => bail!(
                "no echo within the timeout (got {got} of {} bytes)",
                line.len()
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "the connection failed after echoing {got} of {} bytes",
                        line.len()
                    )
                });
            }
        }
    }
    Ok(())
}

fn connect(addr: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| {
            format!("bad address {addr:?} (expected HOST:PORT, e.g. 127.0.0.1:7007 or [::1]:7007)")
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some((a, e)),
        }
    }
    match last {
        Some((a, e)) => Err(e).with_context(|| format!("cannot connect to {a}")),
        None => bail!("address {addr:?} resolves to nothing"),
    }
}

/// Standard input as lines that keep their newline (the last may have none).
struct StdinLines<R>(R);

impl<R: BufRead> Iterator for StdinLines<R> {
    type Item = io::Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut line = Vec::new();
        match self.0.read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) => Some(Ok(line)),
            Err(e) => Some(Err(e)),
        }
    }
}

/// Bytes for an error message: text when printable, escaped otherwise.
fn show(b: &[u8]) -> String {
    format!("\"{}\"", b.escape_ascii())
}

fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn summary(rtts: &[Duration]) {
    if rtts.is_empty() {
        eprintln!("0 echoes");
        return;
    }
    let min = rtts.iter().min().copied().unwrap_or_default();
    let max = rtts.iter().max().copied().unwrap_or_default();
    let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
    eprintln!(
        "{} echo(es), all matched; round trip min {} avg {} max {}",
        rtts.len(),
        fmt_duration(min),
        fmt_duration(avg),
        fmt_duration(max)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_micros(85)), "85 µs");
        assert_eq!(fmt_duration(Duration::from_micros(1500)), "1.50 ms");
        assert_eq!(fmt_duration(Duration::from_millis(2500)), "2.50 s");
    }

    #[test]
    fn stdin_lines_keep_their_newlines() {
        let lines: Vec<Vec<u8>> = StdinLines(&b"a\n\nbc"[..]).map(|l| l.unwrap()).collect();
        assert_eq!(lines, vec![b"a\n".to_vec(), b"\n".to_vec(), b"bc".to_vec()]);
    }

    #[test]
    fn shown_bytes_are_escaped() {
        assert_eq!(show(b"hi\n\x00"), "\"hi\\n\\x00\"");
    }
}
