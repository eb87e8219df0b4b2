//! Unix glue that needs `unsafe` and is shared by the backends and the binary: error mapping,
//! the eventfd waker, the signal thread, CPU pinning, descriptor limits, a socket's peer
//! address, full-length UDP receives, `IP_BIND_ADDRESS_NO_PORT` for the load generator, and
//! process CPU time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use echoport_core::{OpError, Waker};

#[cfg(target_os = "linux")]
pub mod seccomp;

/// Maps an OS error code (positive errno) to the kinds the echo logic tells apart.
pub fn op_error(errno: i32) -> OpError {
    match errno {
        libc::ECANCELED => OpError::Canceled,
        libc::ENOBUFS => OpError::NoBuffers,
        libc::EMFILE | libc::ENFILE => OpError::TooManyFiles,
        e => OpError::Os(e),
    }
}

/// An eventfd that wakes a loop blocked in its backend's wait.
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a negative return is an error, otherwise we own
        // the new descriptor exclusively.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Drains the counter (after a wake-up was seen).
    pub fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64 that lives across the call; the fd is valid
        // for the life of `self`.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Waker for EventFd {
    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64; the fd is valid for the life of `self`.
        // A full counter (EAGAIN) already means "woken", so the result is not needed.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and in every thread it spawns afterwards,
/// then starts a thread that waits for them: the first sets `stop` and wakes every loop, the
/// second exits the process at once with status 128 + signal number.
///
/// Call before spawning the worker threads.
pub fn handle_stop_signals(stop: Arc<AtomicBool>, wakers: Vec<Arc<dyn Waker>>) -> io::Result<()> {
    block_stop_signals()?;
    std::thread::Builder::new()
        .name("echoport-signals".into())
        .spawn(move || {
            let set = stop_signal_set();
            let mut seen = 0;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: both pointers refer to live locals; the signals are blocked in this
                // thread (inherited mask), as sigwait requires.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal = sig, "stopping: no new connections, finishing echoes (signal again to exit at once)");
                    stop.store(true, Ordering::Release);
                    for w in &wakers {
                        w.wake();
                    }
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(128 + sig);
                }
            }
        })?;
    Ok(())
}

fn stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset only writes into it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it spawns afterwards), so
/// that only the signal thread of [`handle_stop_signals`] receives them.
pub fn block_stop_signals() -> io::Result<()> {
    let set = stop_signal_set();
    // SAFETY: `set` is an initialised sigset_t on our stack; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Pins the calling thread to one CPU.
#[cfg(target_os = "linux")]
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU number too large",
        ));
    }
    // SAFETY: the cpu_set_t is zero-initialised on our stack and CPU_SET writes within it
    // (cpu < CPU_SETSIZE was checked); sched_setaffinity reads exactly size_of of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The process's soft limit on open file descriptors.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the local struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Raises the soft limit on open descriptors to the hard limit (as nginx and Go do at
/// start-up: the soft limit exists for old `select` users, which a server is not). An
/// unlimited hard limit is capped at the kernel's `fs.nr_open`, the most a process may ask.
/// Returns (soft limit before, soft limit now).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the local struct we pass, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target <= before {
        return Ok((before, before));
    }
    lim.rlim_cur = target;
    // SAFETY: setrlimit only reads the local struct we pass; a soft limit at most the hard
    // limit is always allowed for an unprivileged process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, target))
}

/// A descriptor passed in by a service manager (systemd's socket activation), with the
/// name the manager gave it (`FileDescriptorName=`, `LISTEN_FDNAMES`).
#[derive(Debug)]
pub struct ListenFd {
    /// The descriptor, now owned by the caller (and close-on-exec).
    pub fd: OwnedFd,
    /// Its name, when the manager gave one.
    pub name: Option<String>,
}

/// Takes the descriptors systemd passed to this process (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`; descriptors from 3 up), as `sd_listen_fds_with_names` does. Empty when
/// none were passed or when they were meant for another process (`LISTEN_PID` is not ours, so
/// a child that inherits the variables takes nothing). Only the first call in a process can
/// return descriptors. The variables are left in place: unsetting them is `unsafe` in a
/// process that may have threads, and `LISTEN_PID` already keeps children from using them.
pub fn take_listen_fds() -> io::Result<Vec<ListenFd>> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    const FIRST: RawFd = 3;
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let ours = pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    if !ours || TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(Vec::new());
    }
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let n: RawFd = match count.as_deref().map(str::trim).map(str::parse) {
        Some(Ok(n)) if (0..=4096).contains(&n) => n,
        _ => {
            return Err(bad(format!(
                "LISTEN_FDS={count:?} is not a descriptor count"
            )));
        }
    };
    let mut names = names.as_deref().unwrap_or("").split(':');
    let mut out = Vec::with_capacity(n as usize);
    for fd in FIRST..FIRST + n {
        // SAFETY: F_GETFD only queries this process's descriptor table; a number that is not
        // open fails with EBADF, which is reported.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: the descriptor is open (checked just above); F_SETFD only sets its flags.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("LISTEN_FDS: descriptor {fd}: {e}"),
            ));
        }
        let name = names.next().filter(|s| !s.is_empty()).map(str::to_string);
        // SAFETY: the protocol hands descriptors 3..3+LISTEN_FDS to this process, which is
        // named by LISTEN_PID (checked); TAKEN makes this the only place that ever takes
        // them, and nothing in the process opened them (they were open before it started),
        // so this OwnedFd is their one owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        out.push(ListenFd { fd, name });
    }
    Ok(out)
}

/// The peer's IP address of a connected socket.
pub fn peer_ip(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::net::IpAddr> {
    let addr = socket2::SockRef::from(&fd).peer_addr().ok()?;
    addr.as_socket().map(|a| a.ip())
}

/// Receives one datagram into `buf` and returns its *full* length (which exceeds
/// `buf.len()` when the datagram was truncated) and its source.
#[cfg(target_os = "linux")]
pub fn recv_from_full(
    sock: &std::net::UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, std::net::SocketAddr)> {
    let s = socket2::SockRef::from(sock);
    // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and the receive only
    // writes initialised bytes into the (already initialised) buffer, so it stays valid u8.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    let (n, from) = s.recv_from_with_flags(uninit, libc::MSG_TRUNC)?;
    let from = from.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address")
    })?;
    Ok((n, from))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on an IPv4 socket that is about to be bound to a source
/// address and then connected: the kernel picks the source port at `connect`, knowing the
/// whole 4-tuple, so each source address offers its own ~28,000 ports per destination
/// instead of sharing one pool among every bound socket. (socket2 has no setter for it.)
#[cfg(target_os = "linux")]
pub fn set_bind_address_no_port(sock: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a pointer to a local c_int and its exact size; the descriptor is borrowed
    // from a live socket for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time the whole process has used so far (all threads, live and exited): (user, system),
/// from `getrusage(RUSAGE_SELF)` with microsecond resolution.
pub fn process_cpu_time() -> io::Result<(std::time::Duration, std::time::Duration)> {
    // SAFETY: rusage is plain data; all-zero is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the local struct we pass.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec.max(0) as u64)
            + std::time::Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    Ok((tv(ru.ru_utime), tv(ru.ru_stime)))
}

/// Clock ticks per second of the times in `/proc/PID/stat` (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as u64 } else { 100 }
}

/// CPU time process `pid` has used so far, in clock ticks ([`clock_ticks_per_second`]):
/// (user, system), from `/proc/PID/stat`. The one reader of that file for the load
/// generator, the tests and the testkit.
pub fn process_cpu_ticks(pid: u32) -> io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_times(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: no utime/stime"),
        )
    })
}

/// [`process_cpu_ticks`] as durations.
pub fn process_cpu_of(pid: u32) -> io::Result<(std::time::Duration, std::time::Duration)> {
    let (u, s) = process_cpu_ticks(pid)?;
    let hz = clock_ticks_per_second() as f64;
    let d = |t: u64| std::time::Duration::from_secs_f64(t as f64 / hz);
    Ok((d(u), d(s)))
}

/// utime and stime (fields 14 and 15) of a `/proc/PID/stat` line. They are counted after the
/// command name, which is in parentheses and may itself hold spaces and `)`.
fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_read_after_the_command_name() {
        let line = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 123 45 0 0 20 0 1";
        assert_eq!(parse_stat_times(line), Some((123, 45)));
        assert_eq!(parse_stat_times("42 (x) S 1 2"), None);
    }

    #[test]
    fn own_cpu_time_grows_while_busy() {
        let (u0, s0) = process_cpu_of(std::process::id()).expect("own /proc stat");
        let (ru0, _) = process_cpu_time().unwrap();
        // Spin until getrusage has seen 200 ms of user time (bounded by 20 s of wall time).
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_time().unwrap().0 - ru0 < std::time::Duration::from_millis(200) {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(t0.elapsed().as_secs() < 20, "never got 200 ms of CPU");
        }
        let (u1, s1) = process_cpu_of(std::process::id()).unwrap();
        let grew = (u1 + s1) - (u0 + s0);
        assert!(
            grew >= std::time::Duration::from_millis(100),
            "/proc saw {grew:?} of a 200 ms busy loop"
        );
    }
}
