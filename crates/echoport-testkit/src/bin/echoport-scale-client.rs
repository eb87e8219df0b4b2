//! Opens many connections to an echo server, checks one echo on every one, then holds them.
//!
//! Usage: `echoport-scale-client ADDR N [SOURCES] [HOLD_SECS]`, or
//! `echoport-scale-client probe ADDR COUNT` (below).
//!
//! Connections are opened one after another (bound to the source addresses in turn, so one
//! process can pass the ephemeral-port limit of a single address pair). When every
//! connection has echoed a message unique to it, the client prints `ready N` and holds them
//! for HOLD_SECS seconds (default 10) or until its standard input closes, whichever comes
//! first; then it checks every connection still echoes, prints `done N`, and exits 0.
//! Any failure prints a reason and exits 1.
//!
//! `probe` measures what a new client sees while the others are held: COUNT times, one after
//! another, it opens a new connection, times one 64-byte echo on it, and closes it; then it
//! prints `probe COUNT p50_us=… p99_us=… max_us=…` (exit 1 if an echo is wrong or missing).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

fn main() {
    if let Err(e) = run() {
        eprintln!("echoport-scale-client: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("probe") {
        return probe(&args[1..]);
    }
    if args.len() < 2 {
        bail!("usage: echoport-scale-client ADDR N [SOURCES] [HOLD_SECS]");
    }
    let addr: SocketAddr = args[0].parse().context("bad ADDR")?;
    let n: usize = args[1].parse().context("bad N")?;
    let sources = match args.get(2) {
        Some(s) if s != "-" => echoport_testkit::parse_sources(s)?,
        _ => Vec::new(),
    };
    let hold = Duration::from_secs_f64(
        args.get(3)
            .map_or(Ok(10.0), |s| s.parse())
            .context("bad HOLD_SECS")?,
    );

    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if !sources.is_empty() {
            let src = SocketAddr::new(sources[i % sources.len()], 0);
            s.bind(&src.into())
                .with_context(|| format!("binding connection {i} to {src}"))?;
        }
        s.connect_timeout(&addr.into(), Duration::from_secs(10))
            .with_context(|| format!("connection {i} of {n}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_tcp_nodelay(true)?;
        conns.push(TcpStream::from(s));
    }
    let connected = started.elapsed();
    echo_all(&mut conns, 0)?;
    println!(
        "ready {n} connect_s={:.2} total_s={:.2}",
        connected.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Hold until the deadline or until stdin closes (the driver's signal to finish).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(hold);
    echo_all(&mut conns, 1)?;
    // Close with a reset: a tool that opens 100,000 connections must not leave as many
    // TIME_WAIT entries holding its source ports for a minute.
    for c in &conns {
        socket2::SockRef::from(c).set_linger(Some(Duration::ZERO))?;
    }
    drop(conns);
    println!("done {n}");
    Ok(())
}

/// Sends a message naming the connection and round to each, then reads every echo back.
fn echo_all(conns: &mut [TcpStream], round: u32) -> anyhow::Result<()> {
    let msg = |i: usize| format!("conn {i:08} round {round}\n").into_bytes();
    // Write in batches so that the kernel buffers, not round trips, set the pace.
    for chunk in (0..conns.len()).collect::<Vec<_>>().chunks(512) {
        for &i in chunk {
            conns[i]
                .write_all(&msg(i))
                .with_context(|| format!("writing to connection {i}"))?;
        }
        for &i in chunk {
            let want = msg(i);
            let mut got = vec![0u8; want.len()];
            conns[i]
                .read_exact(&mut got)
                .with_context(|| format!("reading the echo of connection {i}"))?;
            if got != want {
                bail!(
                    "connection {i}: echo {:?} differs from {:?}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
            }
        }
    }
    Ok(())
}

/// `probe ADDR COUNT`: the echo latency of new clients, one connection per echo.
fn probe(args: &[String]) -> anyhow::Result<()> {
    let (Some(addr), Some(count)) = (args.first(), args.get(1)) else {
        bail!("usage: echoport-scale-client probe ADDR COUNT");
    };
    let addr: SocketAddr = addr.parse().context("bad ADDR")?;
    let count: usize = count.parse().context("bad COUNT")?;
    let msg = [b'p'; 64];
    let mut took = Vec::with_capacity(count);
    for i in 0..count.max(1) {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("probe connection {i}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let t = Instant::now();
        s.write_all(&msg)?;
        let mut got = [0u8; 64];
        s.read_exact(&mut got)
            .with_context(|| format!("reading probe {i}'s echo"))?;
        took.push(t.elapsed());
        if got != msg {
            bail!("probe {i}: the echo differs");
        }
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "probe {} p50_us={} p99_us={} max_us={}",
        took.len(),
        at(0.50).as_micros(),
        at(0.99).as_micros(),
        took[took.len() - 1].as_micros()
    );
    Ok(())
}
