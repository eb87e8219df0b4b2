//! `serve --metrics ADDR`: the live counters in Prometheus text format on `/metrics`, from one
//! small thread of its own (no async runtime, no HTTP crate).
//!
//! The workers never see a scrape: they publish their counters with relaxed stores once per
//! 100 ms tick (`echoport_core::live`), and a scrape only loads them. The thread multiplexes
//! its connections with `poll`, so a slow client (slowloris) holds only its own connection:
//! every request head must arrive whole within [`http::REQUEST_TIMEOUT`] and fit in
//! [`http::MAX_HEAD`] bytes, keep-alive is bounded, and past [`MAX_CONNS`] connections the
//! oldest is closed to make room. With no connection open the thread sleeps in `poll`
//! without a timeout: an unscraped server pays nothing.

mod http;
mod render;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use rustix::event::{PollFd, PollFlags, Timespec};

pub use render::Source;

/// Scrape connections held at once; past this the oldest is closed. (They come out of the
/// same descriptor budget as echo connections: the capacity keeps this many in reserve.)
pub const MAX_CONNS: usize = 64;

/// Binds the metrics listener: loopback only unless `public` (the counters tell whoever
/// can reach them about the server's traffic).
pub fn bind(spec: &str, public: bool) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = spec
        .to_socket_addrs()
        .with_context(|| {
            format!("--metrics {spec:?}: bad address (expected HOST:PORT, e.g. 127.0.0.1:9100)")
        })?
        .next()
        .with_context(|| format!("--metrics {spec:?} resolves to nothing"))?;
    if !addr.ip().is_loopback() && !public {
        bail!(
            "--metrics {addr}: not a loopback address; the metrics describe the server's \
             traffic to anyone who can reach them, so add --metrics-public to serve them there"
        );
    }
    let l =
        TcpListener::bind(addr).with_context(|| format!("--metrics: cannot listen on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `/metrics` on `listener` from a thread of its own, until the process exits.
pub fn spawn(listener: TcpListener, src: Source) -> anyhow::Result<()> {
    let src = Arc::new(src);
    std::thread::Builder::new()
        .name("echoport-metrics".into())
        .spawn(move || event_loop(listener, &src))
        .context("spawning the metrics thread")?;
    Ok(())
}

fn event_loop(listener: TcpListener, src: &Source) {
    let mut conns: Vec<http::Conn> = Vec::new();
    loop {
        let ready = match wait(&listener, &conns) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: poll failed; the endpoint stops");
                return;
            }
        };
        let now = Instant::now();
        // Newest last; a connection that was ready does its step, then the expired go.
        let mut keep = Vec::with_capacity(conns.len());
        for (mut c, r) in conns.drain(..).zip(ready.conns) {
            if r && c.step(src, now) == http::Want::Close {
                continue;
            }
            if c.deadline > now {
                keep.push(c);
            }
        }
        conns = keep;
        if ready.listener {
            accept_all(&listener, &mut conns, now);
        }
    }
}

/// Which sockets are ready.
struct Ready {
    listener: bool,
    conns: Vec<bool>,
}

/// Polls the listener and every connection for what it waits for, until the earliest
/// deadline (forever when there is no connection).
fn wait(listener: &TcpListener, conns: &[http::Conn]) -> std::io::Result<Ready> {
    let mut fds = Vec::with_capacity(conns.len() + 1);
    fds.push(PollFd::new(listener, PollFlags::IN));
    for c in conns {
        let flags = match c.wants() {
            http::Want::Write => PollFlags::OUT,
            _ => PollFlags::IN,
        };
        fds.push(PollFd::new(&c.stream, flags));
    }
    let timeout = conns
        .iter()
        .map(|c| c.deadline)
        .min()
        .map(|d| d.saturating_duration_since(Instant::now()))
        .and_then(|d| Timespec::try_from(d).ok());
    match rustix::event::poll(&mut fds, timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    let ready = |f: &PollFd<'_>| !f.revents().is_empty();
    Ok(Ready {
        listener: ready(&fds[0]),
        conns: fds[1..].iter().map(ready).collect(),
    })
}

/// Takes every waiting connection, closing the oldest past [`MAX_CONNS`].
fn accept_all(listener: &TcpListener, conns: &mut Vec<http::Conn>, now: Instant) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => match http::Conn::new(stream, now) {
                Ok(c) => {
                    if conns.len() >= MAX_CONNS {
                        conns.remove(0);
                    }
                    conns.push(c);
                }
                Err(e) => tracing::debug!(error = %e, "metrics: a connection failed"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, most likely: the next poll tries again; a short pause
                // keeps a level-triggered listener from spinning.
                tracing::debug!(error = %e, "metrics: accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_public() {
        let e = format!("{:#}", bind("0.0.0.0:0", false).unwrap_err());
        assert!(
            e.contains("--metrics 0.0.0.0:0") && e.contains("--metrics-public"),
            "{e}"
        );
        assert!(bind("127.0.0.1:0", false).is_ok());
        assert!(bind("[::1]:0", false).is_ok() || std::net::TcpListener::bind("[::1]:0").is_err());
        assert!(bind("nonsense", false).is_err());
    }
}
