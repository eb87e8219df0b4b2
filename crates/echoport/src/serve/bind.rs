//! Binding the listening sockets: every listen address, one socket per worker thread
//! (`SO_REUSEPORT`) or one socket duplicated for all of them (shared).

use std::net::{SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

use super::args::{Args, DEFAULT_LISTEN, ListenerMode};

/// The two errors `bind_all` forgives on default addresses (Winsock's codes on Windows).
/// Named `errno`, not a `libc` stand-in, so that no module shadows the crate.
mod errno {
    #[cfg(unix)]
    pub use libc::{EADDRNOTAVAIL, EAFNOSUPPORT};
    #[cfg(windows)]
    pub const EAFNOSUPPORT: i32 = 10047;
    #[cfg(windows)]
    pub const EADDRNOTAVAIL: i32 = 10049;
}

/// Every socket the server serves on.
pub struct Sockets {
    /// TCP listeners, grouped by worker thread (one per address each).
    pub tcp: Vec<Vec<TcpListener>>,
    /// The TCP listeners' addresses.
    pub addrs: Vec<SocketAddr>,
    /// UDP sockets (with `--udp`: one per TCP address, on the same port).
    pub udp: Vec<UdpSocket>,
    /// How the threads share each TCP address.
    pub mode: ListenerMode,
}

/// Binds what the flags ask for, or takes the sockets systemd passed in.
pub fn open(args: &Args, threads: usize) -> anyhow::Result<Sockets> {
    #[cfg(unix)]
    if let Some(passed) = crate::systemd::passed_sockets()? {
        return adopt(args, threads, passed);
    }
    let explicit = !args.listen.is_empty();
    let specs: Vec<String> = if explicit {
        args.listen.clone()
    } else {
        DEFAULT_LISTEN.iter().map(|s| s.to_string()).collect()
    };
    let mode = args.listener.unwrap_or_else(ListenerMode::platform_default);
    if cfg!(windows) && mode == ListenerMode::Reuseport {
        bail!(
            "--listener reuseport: Windows has no SO_REUSEPORT; its threads always share one listening socket"
        );
    }
    let tcp = bind_all(&specs, threads, explicit, mode)?;
    let addrs: Vec<SocketAddr> = tcp[0]
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()?;
    let udp = if args.udp {
        crate::udp::bind(&addrs)?
    } else {
        Vec::new()
    };
    Ok(Sockets {
        tcp,
        addrs,
        udp,
        mode,
    })
}

/// Serves the sockets systemd passed in as if bound by `--listen`: each TCP socket shared by
/// every thread (duplicated per thread: one accept queue), each UDP socket echoed (with
/// `--udp`'s guards, whether or not `--udp` was given: the unit asked for it).
#[cfg(unix)]
fn adopt(args: &Args, threads: usize, passed: crate::systemd::Passed) -> anyhow::Result<Sockets> {
    let n = passed.tcp.len() + passed.udp.len();
    if !args.listen.is_empty() {
        bail!(
            "--listen: systemd passed {n} socket(s) in (socket activation); name the addresses \
             in the .socket unit (ListenStream=, ListenDatagram=) instead"
        );
    }
    if args.listener == Some(ListenerMode::Reuseport) {
        bail!(
            "--listener reuseport: a socket passed in by systemd is one socket, which the \
             threads share (--listener shared)"
        );
    }
    let mut tcp: Vec<Vec<TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    let mut addrs = Vec::new();
    for (l, label) in passed.tcp {
        let addr = l.local_addr()?;
        tracing::info!(%addr, socket = %label, "TCP socket passed in by systemd");
        for (t, s) in shared_group(l, threads)?.into_iter().enumerate() {
            tcp[t].push(s);
        }
        addrs.push(addr);
    }
    let mut udp = Vec::new();
    for (u, label) in passed.udp {
        tracing::info!(addr = %u.local_addr()?, socket = %label, "UDP socket passed in by systemd");
        udp.push(u);
    }
    Ok(Sockets {
        tcp,
        addrs,
        udp,
        mode: ListenerMode::Shared,
    })
}

/// Resolves every listen spec and binds `threads` sockets to each (one per worker thread).
///
/// Returns the sockets grouped by thread. Default addresses that cannot be bound because the
/// address family is missing (no IPv6 on the host) are skipped with a warning; anything
/// named explicitly must bind or the whole start fails.
pub fn bind_all(
    specs: &[String],
    threads: usize,
    explicit: bool,
    mode: ListenerMode,
) -> anyhow::Result<Vec<Vec<TcpListener>>> {
    let mut per_thread: Vec<Vec<TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    for spec in specs {
        let addrs: Vec<SocketAddr> = spec
            .to_socket_addrs()
            .with_context(|| format!("bad listen address {spec:?} (expected HOST:PORT, e.g. 127.0.0.1:7007 or [::1]:7007)"))?
            .collect();
        let Some(&addr) = addrs.first() else {
            bail!("listen address {spec:?} resolves to nothing");
        };
        match bind_group(addr, threads, mode) {
            Ok(group) => {
                for (t, l) in group.into_iter().enumerate() {
                    per_thread[t].push(l);
                }
            }
            Err(e)
                if !explicit
                    && matches!(
                        e.raw_os_error(),
                        Some(errno::EAFNOSUPPORT | errno::EADDRNOTAVAIL)
                    ) =>
            {
                tracing::warn!("skipping default address {addr}: {e}");
            }
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        " (another process is listening there; pick another port with --listen)"
                    }
                    std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                    std::io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
                    _ => "",
                };
                bail!("cannot listen on {addr}: {e}{hint}");
            }
        }
    }
    if per_thread[0].is_empty() {
        bail!("no address to listen on");
    }
    Ok(per_thread)
}

/// Binds `n` listening sockets to one address. `Shared`: one socket and `n - 1` duplicates
/// of its descriptor. `Reuseport`: `n` sockets sharing the port with `SO_REUSEPORT`; a plain
/// bind first makes sure nobody else holds the port (reuseport would otherwise let us
/// silently share it with another process of the same user).
#[cfg(unix)]
fn bind_group(addr: SocketAddr, n: usize, mode: ListenerMode) -> std::io::Result<Vec<TcpListener>> {
    let first = listener(addr, false)?;
    if n == 1 {
        return Ok(vec![first]);
    }
    if mode == ListenerMode::Shared {
        return shared_group(first, n);
    }
    let port = first.local_addr()?.port();
    drop(first);
    let mut addr = addr;
    addr.set_port(port);
    (0..n).map(|_| listener(addr, true)).collect()
}

/// Windows has no `SO_REUSEPORT`: one listening socket per address, and the other threads get
/// clones of it, which tell their IOCP backend to join the group the first one deals accepted
/// connections to (see `echoport_io::iocp`).
#[cfg(windows)]
fn bind_group(
    addr: SocketAddr,
    n: usize,
    _mode: ListenerMode,
) -> std::io::Result<Vec<TcpListener>> {
    shared_group(listener(addr, false)?, n)
}

/// `first` and `n - 1` duplicates of its descriptor: one accept queue for `n` threads.
pub fn shared_group(first: TcpListener, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let mut group = Vec::with_capacity(n);
    group.push(first);
    for _ in 1..n {
        let dup = group[0].try_clone()?;
        group.push(dup);
    }
    Ok(group)
}

fn listener(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(windows)]
    {
        // SO_REUSEADDR means port stealing on Windows: ask for the opposite.
        let _ = reuseport;
        echoport_io::sys::exclusive_addr_use(&s)?;
    }
    #[cfg(unix)]
    {
        s.set_reuse_address(true)?;
        if reuseport {
            s.set_reuse_port(true)?;
        }
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: an echo sent in two
    // pieces must not wait ~40 ms for the client's delayed ACK.
    s.set_tcp_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn port_in_use_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = taken.local_addr().unwrap().to_string();
        let err = bind_all(&[spec], 2, true, ListenerMode::Reuseport)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot listen on") && err.contains("another process"),
            "{err}"
        );
    }

    #[test]
    fn bad_address_is_a_clear_error() {
        let err = bind_all(&["nonsense".into()], 1, true, ListenerMode::Reuseport)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad listen address"), "{err}");
    }

    #[test]
    fn port_zero_gives_every_thread_the_same_port() {
        for mode in [ListenerMode::Reuseport, ListenerMode::Shared] {
            if cfg!(windows) && mode == ListenerMode::Reuseport {
                continue; // rejected before binding on Windows
            }
            let g = bind_all(&["127.0.0.1:0".into()], 3, true, mode).unwrap();
            let ports: Vec<u16> = g
                .iter()
                .map(|t| t[0].local_addr().unwrap().port())
                .collect();
            assert!(
                ports.iter().all(|&p| p == ports[0] && p != 0),
                "{mode:?}: {ports:?}"
            );
        }
    }

    #[test]
    fn shared_listeners_are_one_accept_queue() {
        let g = bind_all(&["127.0.0.1:0".into()], 3, true, ListenerMode::Shared).unwrap();
        let addr = g[0][0].local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        // The connection waits in the one queue, so the last thread's socket can take it.
        let last = &g[2][0];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match last.accept() {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "never accepted");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        assert!(
            matches!(g[0][0].accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the connection was accepted twice"
        );
    }
}
