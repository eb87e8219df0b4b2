//! Receiving with the kernel's arrival time: the load generator's ticked loop reads its echoes
//! here, so that reaping them once per tick does not blur their latency.
//!
//! [`enable`] turns on `SO_TIMESTAMPNS` for a socket: the kernel stamps each arriving
//! segment when it is received (on loopback, inside the peer's send) with `CLOCK_REALTIME`,
//! and [`recv`] (`recvmsg`) returns that stamp with the data: TCP reports the stamp of the
//! last segment the call consumed, so a caller that reads one message at a time gets each
//! message's own arrival time. Segments that queue unread are merged by TCP, and the merged
//! one keeps the *latest* arrival: a message read together with (or queued behind) a later
//! one is charged that later arrival. The stamp is therefore never before the message's
//! arrival and never after the read: pessimistic by at most the time it sat queued. The
//! kernel switches stamping on for the whole stack a moment after the first socket asks
//! (deferred work): segments that arrive before that carry no stamp ([`Rx::Data`] with
//! `stamp_ns: None`). [`ReadySet`] is a level-triggered epoll set that says which
//! sockets have data, polled without sleeping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Asks the kernel to stamp segments arriving on `fd` (`SO_TIMESTAMPNS`).
pub fn enable(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is a live c_int on this frame and its size is passed; a bad
    // descriptor only makes the call fail (EBADF/ENOTSOCK).
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What one [`recv`] found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Rx {
    /// `len` bytes; `stamp_ns` is the arrival time of the last segment read (`CLOCK_REALTIME`,
    /// ns since the Unix epoch), when the kernel gave one.
    Data {
        /// Bytes read.
        len: usize,
        /// Arrival time, ns since the Unix epoch.
        stamp_ns: Option<u64>,
    },
    /// The peer closed its side.
    Eof,
    /// Nothing to read now.
    WouldBlock,
}

/// Room for one `SCM_TIMESTAMPNS` control message (a struct timespec), aligned.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Reads up to `buf.len()` bytes from `fd` without blocking, with their arrival time.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Rx> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: msghdr is plain old data; all-zero is a valid "no name, no control" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `iov` names `buf` (live, writable, its exact length) and `msg_control` names
    // `control` (live, 64 bytes, aligned for cmsghdr); both outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Rx::WouldBlock),
            _ => Err(e),
        };
    }
    if n == 0 {
        return Ok(Rx::Eof);
    }
    Ok(Rx::Data {
        len: n as usize,
        stamp_ns: stamp(&msg),
    })
}

/// The `SCM_TIMESTAMPNS` stamp among the control messages `recvmsg` filled in.
fn stamp(msg: &libc::msghdr) -> Option<u64> {
    // SAFETY: `msg` was filled by a successful recvmsg whose control buffer is still live;
    // the CMSG_* macros stay within `msg_controllen` by construction, and the data of an
    // SCM_TIMESTAMPNS message is one struct timespec (read unaligned to be safe).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// A level-triggered epoll set of sockets, polled without sleeping.
pub struct ReadySet {
    ep: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl ReadySet {
    /// An empty set.
    pub fn new() -> io::Result<ReadySet> {
        // SAFETY: epoll_create1 takes a flag word and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ReadySet {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            ep: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        })
    }

    /// Watches `fd` for data (and hang-ups), reporting it as `key`.
    pub fn add(&self, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key,
        };
        // SAFETY: `ev` is a live epoll_event for the length of the call.
        let r = unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Stops watching `fd` (before it is closed: its number may be reused at once).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL (since 2.6.9); a descriptor not
        // in the set only makes the call fail, which changes nothing.
        unsafe {
            libc::epoll_ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }

    /// Appends the keys of the sockets with data (or a hang-up) now, without sleeping.
    pub fn poll(&mut self, out: &mut Vec<u64>) -> io::Result<()> {
        // SAFETY: `events` is a live buffer of `len` epoll_events the kernel may fill.
        let n = unsafe {
            libc::epoll_wait(
                self.ep.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(())
            } else {
                Err(e)
            };
        }
        out.extend(self.events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// `CLOCK_REALTIME` now, ns since the Unix epoch: the clock of the stamps.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let a = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    fn read(fd: RawFd, buf: &mut [u8]) -> (Vec<u8>, u64) {
        match recv(fd, buf).unwrap() {
            Rx::Data { len, stamp_ns } => (buf[..len].to_vec(), stamp_ns.expect("a stamp")),
            other => panic!("no data: {other:?}"),
        }
    }

    /// The kernel turns receive stamping on for the whole stack a moment after the first
    /// socket asks (a deferred static-key switch): until then reads carry no stamp (the
    /// load generator then times them when read). Waits, bounded, until a read has one.
    fn until_stamped(tx: &mut TcpStream, fd: RawFd) {
        let mut buf = [0u8; 64];
        for _ in 0..400 {
            tx.write_all(b"w").unwrap();
            std::thread::sleep(Duration::from_millis(5));
            if let Ok(Rx::Data {
                stamp_ns: Some(_), ..
            }) = recv(fd, &mut buf)
            {
                return;
            }
        }
        panic!("no receive stamp after 2 s of SO_TIMESTAMPNS");
    }

    #[test]
    fn stamps_each_message_with_its_arrival() {
        let (mut tx, rx) = pair();
        let fd = rx.as_raw_fd();
        enable(fd).expect("SO_TIMESTAMPNS");
        until_stamped(&mut tx, fd);
        let mut set = ReadySet::new().expect("epoll");
        set.add(fd, 7).expect("add");
        let mut keys = Vec::new();
        set.poll(&mut keys).expect("poll");
        assert!(keys.is_empty(), "nothing sent yet: {keys:?}");
        let mut buf = [0u8; 64];
        let t0 = realtime_ns();
        tx.write_all(b"first").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        set.poll(&mut keys).expect("poll");
        assert_eq!(keys, vec![7]);
        // Read 30 ms after it came: the stamp is the arrival, not the read.
        let (data, t1) = read(fd, &mut buf);
        let read1 = realtime_ns();
        assert_eq!(data, b"first");
        assert!(
            t0 <= t1 && read1 - t1 >= 25_000_000,
            "sent {t0}, stamped {t1}, read {read1}"
        );
        tx.write_all(b"second").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let (data, t2) = read(fd, &mut buf);
        assert_eq!(data, b"second");
        assert!(
            t2 >= read1 && realtime_ns() - t2 >= 25_000_000,
            "stamped {t2}"
        );
        assert_eq!(recv(fd, &mut buf).unwrap(), Rx::WouldBlock);
        drop(tx);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(recv(fd, &mut buf).unwrap(), Rx::Eof);
        set.remove(fd);
    }

    #[test]
    fn queued_segments_carry_the_later_arrival_never_an_earlier_one() {
        // TCP merges small segments queued unread; the merged one keeps the last arrival,
        // so an earlier message read with it is charged later (pessimistic), never earlier.
        let (mut tx, rx) = pair();
        let fd = rx.as_raw_fd();
        enable(fd).expect("SO_TIMESTAMPNS");
        until_stamped(&mut tx, fd);
        tx.write_all(b"a").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let between = realtime_ns();
        tx.write_all(b"b").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let mut one = [0u8; 1];
        let (data, t) = read(fd, &mut one);
        assert_eq!(data, b"a");
        assert!(
            t >= between,
            "the first byte's stamp {t} precedes the second's send {between}"
        );
    }
}
