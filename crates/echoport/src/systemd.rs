//! systemd integration: sockets passed in by socket activation (`LISTEN_FDS`), served as if
//! bound by `--listen`, and `sd_notify` readiness and stopping messages (`NOTIFY_SOCKET`).
//!
//! The notification protocol is one datagram of `KEY=VALUE` lines to the Unix socket named
//! in `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); written here with std's
//! `UnixDatagram` rather than a crate: it is a dozen lines.

use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;

use anyhow::{Context, anyhow, bail};
use socket2::{Socket, Type};

/// Sockets systemd passed in, by kind, each with a label for the logs ("fd 3 (echoport.socket)").
#[derive(Default)]
pub struct Passed {
    /// Listening TCP sockets.
    pub tcp: Vec<(TcpListener, String)>,
    /// UDP sockets.
    pub udp: Vec<(UdpSocket, String)>,
}

/// Takes the sockets passed by socket activation; None when there are none.
pub fn passed_sockets() -> anyhow::Result<Option<Passed>> {
    let fds = echoport_io::sys::take_listen_fds().context("socket activation")?;
    if fds.is_empty() {
        return Ok(None);
    }
    let mut passed = Passed::default();
    for (i, f) in fds.into_iter().enumerate() {
        let label = match &f.name {
            Some(n) => format!("fd {} ({n})", 3 + i),
            None => format!("fd {}", 3 + i),
        };
        let sock = Socket::from(f.fd);
        let addr = sock.local_addr()?.as_socket().ok_or_else(|| {
            anyhow!("socket activation: {label} is not an IP socket (only TCP and UDP are served)")
        })?;
        match sock.r#type()? {
            Type::STREAM if sock.is_listener()? => {
                sock.set_nonblocking(true)?;
                // Accepted sockets inherit it: an echo in two pieces must not wait for a
                // delayed ACK (as for the sockets echoport binds itself).
                sock.set_tcp_nodelay(true)?;
                passed.tcp.push((sock.into(), label));
            }
            Type::STREAM => bail!(
                "socket activation: {label} ({addr}) is a connected stream socket; echoport \
                 takes listening sockets (Accept=no in the .socket unit)"
            ),
            Type::DGRAM => passed.udp.push((sock.into(), label)),
            other => {
                bail!("socket activation: {label} ({addr}) has type {other:?}, not TCP or UDP")
            }
        }
    }
    Ok(Some(passed))
}

/// Where to send `sd_notify` messages, when the service manager asked for them.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    to: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; None when it is not set. A malformed value is an error.
    pub fn from_env() -> anyhow::Result<Option<Notifier>> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let path = path.to_string_lossy().into_owned();
        let to = notify_addr(&path).with_context(|| format!("NOTIFY_SOCKET={path:?}"))?;
        let sock = UnixDatagram::unbound().context("creating the notify socket")?;
        Ok(Some(Notifier { sock, to }))
    }

    /// Sends one message (`READY=1\nSTATUS=...`); a failure is logged, never fatal.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.to) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// Sends `STOPPING=1` when the stop begins (it is one of the signal thread's wakers).
impl echoport_core::Waker for Notifier {
    fn wake(&self) {
        self.send("STOPPING=1\nSTATUS=Stopping: no new connections, finishing echoes");
    }
}

#[cfg(target_os = "linux")]
fn notify_addr(path: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match path.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(path),
    }
}

#[cfg(not(target_os = "linux"))]
fn notify_addr(path: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    std::os::unix::net::SocketAddr::from_pathname(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("echoport-notify-unit-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let rx = UnixDatagram::bind(&dir).unwrap();
        let n = Notifier {
            sock: UnixDatagram::unbound().unwrap(),
            to: notify_addr(dir.to_str().unwrap()).unwrap(),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
        let _ = std::fs::remove_file(&dir);

        let name = format!("@echoport-notify-unit-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&notify_addr(&name).unwrap()).unwrap();
        echoport_core::Waker::wake(&Notifier {
            sock: UnixDatagram::unbound().unwrap(),
            to: notify_addr(&name).unwrap(),
        });
        let k = rx.recv(&mut buf).unwrap();
        assert!(
            buf[..k].starts_with(b"STOPPING=1\nSTATUS="),
            "{:?}",
            &buf[..k]
        );
    }
}
