//! Unit tests of the epoll backend's own bookkeeping (the shared contract is in
//! `tests/contract.rs`).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use echoport_core::{Backend, Completion, Op, Received, Submit, Token};

use super::{Config, Epoll};
use crate::pool::PoolConfig;

/// An epoll set with a small pool.
fn small() -> Epoll {
    Epoll::new(&Config {
        pool: PoolConfig {
            buf_size: 4096,
            buffers: 16,
            send_buffers: 1,
        },
        ..Config::default()
    })
    .unwrap()
}

/// Raises the soft descriptor limit to the hard one (as the server does at start-up).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// Moves a stream to the lowest free descriptor at or above `at`.
fn move_to_fd(stream: TcpStream, at: i32) -> TcpStream {
    let old = stream.into_raw_fd();
    // SAFETY: `old` is an open descriptor we own; F_DUPFD_CLOEXEC takes no pointers and
    // never replaces an open descriptor (it picks the lowest free one at or above `at`).
    let new = unsafe { libc::fcntl(old, libc::F_DUPFD_CLOEXEC, at) };
    assert!(
        new >= at,
        "cannot duplicate to fd {at}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: both descriptors are ours: `old` is closed once here, `new` is handed on.
    unsafe {
        libc::close(old);
        TcpStream::from_raw_fd(new)
    }
}

/// A worker's connection table follows the connections it holds, not the descriptor
/// numbers, which are the process's: a connection on fd 15,000 takes one slot, not 15,001
/// (with a slot per descriptor, every worker's table grew toward the largest descriptor any
/// thread had accepted).
#[test]
fn a_connection_on_a_large_descriptor_takes_one_slot() {
    const FD: i32 = 15_000;
    let limit = raise_nofile();
    assert!(
        limit > FD as u64,
        "this test needs RLIMIT_NOFILE above {FD} (the hard limit is {limit})"
    );
    let mut ep = small();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    let server = move_to_fd(server, FD);
    let sock = ep.adopt(server).unwrap();
    assert!(
        ep.slot_capacity() < 64,
        "one connection allocated {} slots",
        ep.slot_capacity()
    );
    // And the connection works through its slot.
    assert!(ep.peer_ip(sock).is_some());
    let token = Token::new(1, 1);
    ep.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    client.write_all(b"high").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        let mut out = Vec::new();
        ep.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        got = out.into_iter().find_map(|c| match c {
            Completion::Recv {
                result: Ok(Received::Data { buf, len }),
                ..
            } => Some((buf, len)),
            _ => None,
        });
    }
    let (buf, len) = got.expect("the bytes arrived");
    assert_eq!(&ep.buf(buf)[..len as usize], b"high");
    ep.release(buf);
}

/// A closed connection's slot is reused, and its old name reaches nothing: an operation
/// posted late on it fails instead of landing on the next connection.
#[test]
fn a_closed_slot_is_reused_and_its_old_name_is_refused() {
    let mut ep = small();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _c1 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let old = ep.adopt(l.accept().unwrap().0).unwrap();
    ep.push(Op::Close {
        token: Token::NONE,
        sock: old,
    });
    let _c2 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let new = ep.adopt(l.accept().unwrap().0).unwrap();
    assert_eq!(ep.slot_capacity(), ep.slots.capacity());
    assert_eq!(ep.slots.len(), 1, "the vacant slot was reused");
    assert_ne!(old, new, "a reused slot has a new name");
    assert!(ep.peer_ip(old).is_none());
    assert!(ep.peer_ip(new).is_some());
    let token = Token::new(2, 1);
    ep.push(Op::Recv {
        token,
        sock: old,
        max: u32::MAX,
    });
    let mut out = Vec::new();
    ep.wait(&mut out, Some(Duration::from_millis(10))).unwrap();
    assert_eq!(
        out,
        vec![Completion::Recv {
            token,
            result: Err(echoport_core::OpError::Os(libc::EBADF)),
            more: false,
        }]
    );
}
