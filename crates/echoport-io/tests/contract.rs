//! The [`Backend`] contract, checked on every backend with the same code (io_uring and epoll on
//! Linux, IOCP on Windows, where CI runs it under wine): what the echo state machine relies
//! on, seen from the operations and completions alone.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use echoport_core::{
    Backend, BufId, Completion, MAX_SEND_PARTS, Op, OpError, Received, SendPart, Socket, Token,
};
#[cfg(target_os = "linux")]
use echoport_io::epoll::{Config as EpollConfig, Epoll};
#[cfg(windows)]
use echoport_io::iocp::{Config as IocpConfig, Iocp};
#[cfg(target_os = "linux")]
use echoport_io::uring::{Config as UringConfig, Uring};

/// Small pools, so running dry is easy to arrange.
#[cfg(target_os = "linux")]
fn new_uring(buffers: u32) -> Uring {
    Uring::new(&UringConfig {
        pool: echoport_io::pool::PoolConfig {
            buffers,
            buf_size: 4096,
            send_buffers: 4,
        },
        cq_entries: 1024,
        sq_entries: 256,
        ..Default::default()
    })
    .expect("io_uring ring")
}

#[cfg(target_os = "linux")]
fn new_epoll(buffers: u32) -> Epoll {
    Epoll::new(&EpollConfig {
        pool: echoport_io::pool::PoolConfig {
            buffers,
            buf_size: 4096,
            send_buffers: 4,
        },
        ..Default::default()
    })
    .expect("epoll set")
}

#[cfg(windows)]
fn new_iocp(buffers: u32) -> Iocp {
    Iocp::new(&IocpConfig {
        pool: echoport_io::pool::PoolConfig {
            buffers,
            buf_size: 4096,
            send_buffers: 4,
        },
        ..Default::default()
    })
    .expect("completion port")
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        #[cfg(target_os = "linux")]
        mod io_uring {
            $( #[test] fn $name() { super::$name(super::new_uring) } )*
        }
        #[cfg(target_os = "linux")]
        mod epoll {
            $( #[test] fn $name() { super::$name(super::new_epoll) } )*
        }
        #[cfg(windows)]
        mod iocp {
            $( #[test] fn $name() { super::$name(super::new_iocp) } )*
        }
    };
}

on_every_backend!(
    accepted_connections_arrive_and_accepting_stays_possible,
    a_cancelled_receive_ends_exactly_once,
    data_then_end_of_stream_end_the_receive,
    an_empty_pool_reports_no_buffers_and_recovers_on_release,
    a_send_to_a_full_socket_completes_short_or_is_cancelled_once,
    a_wake_from_another_thread_ends_the_wait,
    a_gathered_send_delivers_its_parts_in_order,
    urgent_data_is_left_out_and_the_stream_goes_on,
    a_double_release_is_refused_by_the_pool,
    a_foreign_release_is_refused_by_the_pool,
    a_receive_ends_at_its_allowance,
);

/// Reaps completions until `done` says so or `limit` passes; returns them all.
fn reap<B: Backend>(
    b: &mut B,
    limit: Duration,
    mut done: impl FnMut(&[Completion]) -> bool,
) -> Vec<Completion> {
    let deadline = Instant::now() + limit;
    let mut all = Vec::new();
    let mut out = Vec::new();
    while !done(&all) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        out.clear();
        b.wait(&mut out, Some(left.min(Duration::from_millis(50))))
            .expect("wait");
        all.extend_from_slice(&out);
    }
    all
}

/// A listener registered with the backend, an accept posted, one client connected and its
/// server side accepted: (client, server socket).
fn connected_pair<B: Backend>(b: &mut B) -> (TcpStream, Socket) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let id = b.add_listener(l).unwrap();
    b.push(Op::Accept { listener: id });
    let client = TcpStream::connect(addr).unwrap();
    let got = reap(b, Duration::from_secs(5), |c| {
        c.iter()
            .any(|c| matches!(c, Completion::Accept { result: Ok(_), .. }))
    });
    let sock = got
        .iter()
        .find_map(|c| match c {
            Completion::Accept { result: Ok(s), .. } => Some(*s),
            _ => None,
        })
        .expect("the connection was accepted");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (client, sock)
}

fn recvs(all: &[Completion], token: Token) -> Vec<(Result<Received, OpError>, bool)> {
    all.iter()
        .filter_map(|c| match *c {
            Completion::Recv {
                token: t,
                result,
                more,
            } if t == token => Some((result, more)),
            _ => None,
        })
        .collect()
}

fn accepted_connections_arrive_and_accepting_stays_possible<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(16);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let id = b.add_listener(l).unwrap();
    b.push(Op::Accept { listener: id });
    let clients: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut socks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while socks.len() < clients.len() && Instant::now() < deadline {
        let mut out = Vec::new();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        for c in out {
            if let Completion::Accept {
                listener,
                result,
                more,
            } = c
            {
                assert_eq!(listener, id);
                socks.push(result.expect("accept succeeds"));
                if !more {
                    // One-shot accept: post the next one, as the worker does.
                    b.push(Op::Accept { listener: id });
                }
            }
        }
    }
    assert_eq!(socks.len(), 5, "accepted {socks:?}");
    let mut unique = socks.clone();
    unique.sort_by_key(|s| s.0);
    unique.dedup();
    assert_eq!(unique.len(), 5, "a socket was reported twice: {socks:?}");
    for s in socks {
        b.push(Op::Close {
            token: Token::NONE,
            sock: s,
        });
    }
    reap(&mut b, Duration::from_millis(50), |_| false);
}

fn a_cancelled_receive_ends_exactly_once<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(16);
    let (_client, sock) = connected_pair(&mut b);
    let token = Token::new(7, 3);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    reap(&mut b, Duration::from_millis(100), |_| false);
    b.push(Op::CancelRecv { token, sock });
    let all = reap(&mut b, Duration::from_millis(500), |_| false);
    let r = recvs(&all, token);
    assert_eq!(
        r,
        vec![(Err(OpError::Canceled), false)],
        "a cancelled idle receive ends once, as cancelled"
    );
    // Cancelling what already ended reports nothing.
    b.push(Op::CancelRecv { token, sock });
    let all = reap(&mut b, Duration::from_millis(200), |_| false);
    assert!(recvs(&all, token).is_empty(), "{all:?}");
    b.push(Op::Close { token, sock });
    reap(&mut b, Duration::from_millis(50), |_| false);
}

fn data_then_end_of_stream_end_the_receive<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(16);
    let (mut client, sock) = connected_pair(&mut b);
    let token = Token::new(1, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    client.write_all(&payload).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let mut ended = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ended && Instant::now() < deadline {
        let mut out = Vec::new();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        for c in out {
            let Completion::Recv {
                token: t,
                result,
                more,
            } = c
            else {
                continue;
            };
            assert_eq!(t, token);
            assert!(!ended, "a completion after the receive ended");
            match result {
                Ok(Received::Data { buf, len }) => {
                    got.extend_from_slice(&b.buf(buf)[..len as usize]);
                    b.release(buf);
                    if !more {
                        b.push(Op::Recv {
                            token,
                            sock,
                            max: u32::MAX,
                        }); // one-shot: post the next
                    }
                }
                Ok(Received::Eof) => {
                    assert!(!more, "end of stream must end the receive");
                    ended = true;
                }
                Err(e) => panic!("receive failed: {e}"),
            }
        }
    }
    assert!(ended, "end of stream never came");
    assert!(
        got == payload,
        "received {} bytes, not the payload",
        got.len()
    );
    b.push(Op::Close { token, sock });
    reap(&mut b, Duration::from_millis(50), |_| false);
}

fn an_empty_pool_reports_no_buffers_and_recovers_on_release<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(1);
    let (mut c1, s1) = connected_pair(&mut b);
    let (mut c2, s2) = connected_pair(&mut b);
    let (t1, t2) = (Token::new(1, 1), Token::new(2, 1));
    b.push(Op::Recv {
        token: t1,
        sock: s1,
        max: u32::MAX,
    });
    c1.write_all(b"first").unwrap();
    let all = reap(&mut b, Duration::from_secs(5), |c| !recvs(c, t1).is_empty());
    let Some((Ok(Received::Data { buf, len: 5 }), _)) = recvs(&all, t1).first().copied() else {
        panic!("no data on the first connection: {all:?}");
    };
    // The only buffer is lent out: the second connection's data finds none.
    b.push(Op::Recv {
        token: t2,
        sock: s2,
        max: u32::MAX,
    });
    c2.write_all(b"second").unwrap();
    let all = reap(&mut b, Duration::from_secs(5), |c| !recvs(c, t2).is_empty());
    assert_eq!(
        recvs(&all, t2),
        vec![(Err(OpError::NoBuffers), false)],
        "{all:?}"
    );
    // Its bytes were not lost: after the release, a new receive gets them.
    b.release(buf);
    b.push(Op::Recv {
        token: t2,
        sock: s2,
        max: u32::MAX,
    });
    let all = reap(&mut b, Duration::from_secs(5), |c| !recvs(c, t2).is_empty());
    match recvs(&all, t2).first() {
        Some((Ok(Received::Data { buf, len }), _)) => {
            assert_eq!(&b.buf(*buf)[..*len as usize], b"second");
            b.release(*buf);
        }
        other => panic!("expected the parked bytes, got {other:?}"),
    }
    for (token, sock) in [(t1, s1), (t2, s2)] {
        b.push(Op::CancelRecv { token, sock });
    }
    reap(&mut b, Duration::from_millis(200), |_| false);
    for (token, sock) in [(t1, s1), (t2, s2)] {
        b.push(Op::Close { token, sock });
    }
    reap(&mut b, Duration::from_millis(50), |_| false);
}

fn a_gathered_send_delivers_its_parts_in_order<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(4);
    let (mut client, sock) = connected_pair(&mut b);
    let token = Token::new(5, 2);
    let (b1, b2) = (b.alloc_buf().unwrap(), b.alloc_buf().unwrap());
    for (i, x) in b.buf_mut(b1).iter_mut().enumerate() {
        *x = i as u8;
    }
    for (i, x) in b.buf_mut(b2).iter_mut().enumerate() {
        *x = 255 - i as u8;
    }
    // Three pieces, out of buffer order: the bytes must go out in the order of the parts.
    let pieces = [(b1, 0u32, 100u32), (b2, 10, 50), (b1, 200, 30)];
    let mut parts = [SendPart::default(); MAX_SEND_PARTS];
    let mut want = Vec::new();
    for (p, &(buf, off, len)) in parts.iter_mut().zip(&pieces) {
        *p = SendPart { buf, off, len };
        want.extend_from_slice(&b.buf(buf)[off as usize..(off + len) as usize]);
    }
    b.push(Op::SendParts {
        token,
        sock,
        parts,
        count: 3,
    });
    let all = reap(&mut b, Duration::from_secs(5), |c| {
        c.iter().any(|c| matches!(c, Completion::Send { .. }))
    });
    let n = match all.iter().find_map(|c| match c {
        Completion::Send { token: t, result } if *t == token => Some(*result),
        _ => None,
    }) {
        Some(Ok(n)) => n as usize,
        other => panic!("expected the send's completion, got {other:?}"),
    };
    if b.max_send_parts() >= 3 {
        assert_eq!(
            n,
            want.len(),
            "an idle loopback socket takes 180 bytes at once"
        );
    } else {
        // A backend that does not gather sends the first part: a short send.
        assert!(n > 0 && n <= 100, "sent {n}");
    }
    let mut got = vec![0u8; n];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, want[..n], "the parts arrived out of order or altered");
    b.push(Op::Close { token, sock });
    reap(&mut b, Duration::from_millis(50), |_| false);
}

fn a_send_to_a_full_socket_completes_short_or_is_cancelled_once<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(4);
    let (mut client, sock) = connected_pair(&mut b);
    let token = Token::new(3, 9);
    let buf: BufId = b.alloc_buf().expect("a send buffer");
    b.buf_mut(buf).fill(0xAB);
    let len = b.buf(buf).len() as u32;
    // Fill the path to the client, which does not read, until a send stalls.
    let mut sent = 0u64;
    let stalled = loop {
        b.push(Op::Send {
            token,
            sock,
            buf,
            off: 0,
            len,
        });
        let all = reap(&mut b, Duration::from_millis(300), |c| {
            c.iter().any(|c| matches!(c, Completion::Send { .. }))
        });
        match all.iter().find_map(|c| match c {
            Completion::Send { token: t, result } if *t == token => Some(*result),
            _ => None,
        }) {
            Some(Ok(n)) => {
                assert!(n > 0 && n <= len, "sent {n} of {len}");
                sent += n as u64;
                assert!(sent < 256 << 20, "never stalled");
            }
            Some(Err(e)) => panic!("send failed: {e}"),
            None => break true,
        }
    };
    assert!(stalled);
    b.push(Op::CancelSend { token, sock });
    let all = reap(&mut b, Duration::from_secs(2), |_| false);
    let ends: Vec<_> = all
        .iter()
        .filter(|c| matches!(c, Completion::Send { token: t, .. } if *t == token))
        .collect();
    assert_eq!(
        ends.len(),
        1,
        "the stalled send must end exactly once: {all:?}"
    );
    if let Completion::Send { result: Ok(n), .. } = ends[0] {
        sent += *n as u64;
    }
    // Everything reported sent really arrives, byte for byte (a generous timeout: this is
    // about the bytes, and a busy machine may deliver them late).
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut read = 0u64;
    let mut chunk = vec![0u8; 1 << 16];
    while read < sent {
        let n = client.read(&mut chunk).expect("read what was sent");
        assert!(chunk[..n].iter().all(|&x| x == 0xAB));
        read += n as u64;
    }
    assert_eq!(read, sent);
    b.release(buf);
    b.push(Op::Close { token, sock });
    reap(&mut b, Duration::from_millis(50), |_| false);
}

fn a_wake_from_another_thread_ends_the_wait<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(4);
    let w = b.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        w.wake();
    });
    let start = Instant::now();
    let mut out = Vec::new();
    while !out.contains(&Completion::Wake) && start.elapsed() < Duration::from_secs(5) {
        b.wait(&mut out, None).unwrap();
    }
    t.join().unwrap();
    assert!(out.contains(&Completion::Wake), "{out:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

// ---- epoll branch: urgent data, allowance, pool refusals, drop ----

/// Reaps a connection's receive until `want` bytes have come (or `limit` passes), releasing
/// each buffer and posting the receive again whenever one ends with data. `posted` says
/// whether a receive is posted, before and after. End of stream or an error fails.
fn read_stream<B: Backend>(
    b: &mut B,
    token: Token,
    sock: Socket,
    posted: &mut bool,
    want: usize,
    limit: Duration,
) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        if !*posted {
            b.push(Op::Recv {
                token,
                sock,
                max: u32::MAX,
            });
            *posted = true;
        }
        let mut out = Vec::new();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        for (result, more) in recvs(&out, token) {
            *posted = more;
            match result {
                Ok(Received::Data { buf, len }) => {
                    got.extend_from_slice(&b.buf(buf)[..len as usize]);
                    b.release(buf);
                }
                other => panic!("the receive ended with {other:?} after {got:?}"),
            }
        }
    }
    got
}

/// TCP urgent data (`MSG_OOB`) without `SO_OOBINLINE`: the kernel takes the urgent byte out of
/// the stream and a read stops short at its mark, with bytes still queued behind it. The
/// backend must deliver the bytes around it in order (the urgent byte is not among them),
/// and go on receiving afterwards.
fn urgent_data_is_left_out_and_the_stream_goes_on<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(16);
    let (mut client, sock) = connected_pair(&mut b);
    client.set_nodelay(true).unwrap();
    client.write_all(b"abc").unwrap();
    let oob = socket2::SockRef::from(&client).send_out_of_band(b"X");
    assert_eq!(oob.unwrap(), 1, "the urgent byte was sent");
    client.write_all(b"def").unwrap();
    // The whole burst lands before the receive is posted, so its first read meets the
    // urgent mark with "def" queued behind it and no further edge to come.
    std::thread::sleep(Duration::from_millis(100));
    let token = Token::new(6, 1);
    let mut posted = false;
    let got = read_stream(&mut b, token, sock, &mut posted, 6, Duration::from_secs(3));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "abcdef",
        "the bytes around the urgent byte, in order, and nothing else"
    );
    client.write_all(b"ghi").unwrap();
    let got = read_stream(&mut b, token, sock, &mut posted, 3, Duration::from_secs(3));
    assert_eq!(String::from_utf8_lossy(&got), "ghi", "normal data goes on");
    if posted {
        b.push(Op::CancelRecv { token, sock });
        reap(&mut b, Duration::from_millis(100), |_| false);
    }
    b.push(Op::Close { token, sock });
    reap(&mut b, Duration::from_millis(50), |_| false);
}

/// Releases `buf`, which the caller does not hold, and checks the pool refused it: a debug
/// build stops on it (a panic naming the buffer pool), a release build goes on; both count it.
fn release_is_refused<B: Backend>(b: &mut B, buf: BufId) {
    let before = b.buffer_misuses();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.release(buf)));
    if cfg!(debug_assertions) {
        let err = r.expect_err("a debug build stops on a refused release");
        let msg = err
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| err.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        assert!(msg.contains("buffer pool"), "panicked with {msg:?}");
    } else {
        assert!(r.is_ok(), "a release build reports and goes on");
    }
    assert_eq!(b.buffer_misuses(), before + 1, "the refusal is counted");
}

/// Two connections receive at once while holding what they received: no buffer may be lent
/// to both (which is what a buffer put back twice would do), and each gets its own bytes.
fn two_receives_get_distinct_buffers<B: Backend>(b: &mut B) {
    let (mut c1, s1) = connected_pair(b);
    let (mut c2, s2) = connected_pair(b);
    let (t1, t2) = (Token::new(11, 1), Token::new(12, 1));
    for (token, sock) in [(t1, s1), (t2, s2)] {
        b.push(Op::Recv {
            token,
            sock,
            max: u32::MAX,
        });
    }
    c1.write_all(b"AAAA").unwrap();
    c2.write_all(b"BBBB").unwrap();
    let all = reap(b, Duration::from_secs(5), |c| {
        [t1, t2].iter().all(|&t| {
            let got: u32 = recvs(c, t)
                .iter()
                .map(|r| match r.0 {
                    Ok(Received::Data { len, .. }) => len,
                    _ => 0,
                })
                .sum();
            got >= 4
        })
    });
    let mut lent = Vec::new();
    for (token, want) in [(t1, b"AAAA"), (t2, b"BBBB")] {
        let mut got = Vec::new();
        for (result, _) in recvs(&all, token) {
            let Ok(Received::Data { buf, len }) = result else {
                panic!("{token:?}: {result:?}");
            };
            got.extend_from_slice(&b.buf(buf)[..len as usize]);
            lent.push(buf);
        }
        assert_eq!(got, want, "{token:?} got another connection's bytes");
    }
    let mut unique = lent.clone();
    unique.sort_by_key(|b| b.0);
    unique.dedup();
    assert_eq!(unique.len(), lent.len(), "one buffer lent twice: {lent:?}");
    for buf in lent {
        b.release(buf);
    }
    for (token, sock) in [(t1, s1), (t2, s2)] {
        b.push(Op::CancelRecv { token, sock });
    }
    reap(b, Duration::from_millis(100), |_| false);
    for (token, sock) in [(t1, s1), (t2, s2)] {
        b.push(Op::Close { token, sock });
    }
    reap(b, Duration::from_millis(50), |_| false);
}

fn a_double_release_is_refused_by_the_pool<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(4);
    let (mut client, sock) = connected_pair(&mut b);
    let token = Token::new(10, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    client.write_all(b"one").unwrap();
    let all = reap(&mut b, Duration::from_secs(5), |c| {
        !recvs(c, token).is_empty()
    });
    let Some((Ok(Received::Data { buf, len: 3 }), more)) = recvs(&all, token).first().copied()
    else {
        panic!("no data: {all:?}");
    };
    b.release(buf);
    assert_eq!(b.buffer_misuses(), 0, "the first release is fine");
    release_is_refused(&mut b, buf);
    if more {
        b.push(Op::CancelRecv { token, sock });
    }
    reap(&mut b, Duration::from_millis(100), |_| false);
    b.push(Op::Close { token, sock });
    two_receives_get_distinct_buffers(&mut b);
    assert_eq!(b.buffer_misuses(), 1);
}

fn a_foreign_release_is_refused_by_the_pool<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(4);
    // The last receive buffer, never lent: the kernel's (io_uring's ring) or free (epoll).
    let last = BufId(b.total_buffers() as u32 - 1);
    release_is_refused(&mut b, last);
    // A buffer that does not exist.
    release_is_refused(&mut b, BufId(1 << 20));
    assert_eq!(b.free_buffers(), b.total_buffers(), "nothing was added");
    two_receives_get_distinct_buffers(&mut b);
    assert_eq!(b.buffer_misuses(), 2);
}

fn a_receive_ends_at_its_allowance<B: Backend>(new: fn(u32) -> B) {
    const MAX: u32 = 10;
    let mut b = new(16);
    let (mut client, sock) = connected_pair(&mut b);
    let size = b.buf_size() as usize;
    let token = Token::new(13, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: MAX,
    });
    let payload: Vec<u8> = (0..100u8).collect();
    let chunks = payload.clone();
    let writer = std::thread::spawn(move || {
        for c in chunks.chunks(10) {
            client.write_all(c).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        client
    });
    let all = reap(&mut b, Duration::from_secs(5), |c| {
        recvs(c, token).iter().any(|r| !r.1)
    });
    let first = recvs(&all, token);
    let mut got = Vec::new();
    for (i, (result, more)) in first.iter().enumerate() {
        let Ok(Received::Data { buf, len }) = *result else {
            panic!("completion {i}: {result:?} ({first:?})");
        };
        assert_eq!(
            *more,
            i + 1 < first.len(),
            "only the last ends it: {first:?}"
        );
        got.extend_from_slice(&b.buf(buf)[..len as usize]);
        b.release(buf);
    }
    assert!(
        first.last().is_some_and(|r| !r.1),
        "the receive never ended: {first:?}"
    );
    assert!(
        got.len() >= MAX as usize && got.len() <= MAX as usize + size,
        "delivered {} bytes on an allowance of {MAX} (buffers of {size})",
        got.len()
    );
    // Ended: the rest of the writes bring nothing until a new receive is posted.
    let quiet = reap(&mut b, Duration::from_millis(400), |_| false);
    assert!(recvs(&quiet, token).is_empty(), "{quiet:?}");
    // Kept open to the end: its end of stream would end a receive posted below.
    let client = writer.join().unwrap();
    let mut posted = false;
    let rest = payload.len() - got.len();
    got.extend(read_stream(
        &mut b,
        token,
        sock,
        &mut posted,
        rest,
        Duration::from_secs(5),
    ));
    assert_eq!(got, payload, "every byte, once, in order");
    if posted {
        b.push(Op::CancelRecv { token, sock });
        reap(&mut b, Duration::from_millis(100), |_| false);
    }
    b.push(Op::Close { token, sock });
    reap(&mut b, Duration::from_millis(50), |_| false);
    drop(client);
}

#[cfg(target_os = "linux")]
mod dropping {
    #[test]
    fn epoll() {
        super::dropping_with_a_receive_and_a_send_pending_closes_cleanly(super::new_epoll)
    }
    #[test]
    fn io_uring() {
        super::dropping_with_a_receive_and_a_send_pending_closes_cleanly(super::new_uring)
    }
}

/// A backend dropped while a receive and a stalled send are posted closes the connection:
/// the peer reads every byte the backend reported sent (and possibly the tail a cancelled
/// send had already handed to the kernel), then end of stream.
#[cfg(target_os = "linux")]
fn dropping_with_a_receive_and_a_send_pending_closes_cleanly<B: Backend>(new: fn(u32) -> B) {
    let mut b = new(4);
    let (mut client, sock) = connected_pair(&mut b);
    let token = Token::new(14, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    let buf = b.alloc_buf().expect("a send buffer");
    b.buf_mut(buf).fill(0xCD);
    let len = b.buf_size();
    let mut sent = 0u64;
    loop {
        b.push(Op::Send {
            token,
            sock,
            buf,
            off: 0,
            len,
        });
        let all = reap(&mut b, Duration::from_millis(300), |c| {
            c.iter().any(|c| matches!(c, Completion::Send { .. }))
        });
        match all.iter().find_map(|c| match c {
            Completion::Send { result, .. } => Some(*result),
            _ => None,
        }) {
            Some(Ok(n)) => sent += n as u64,
            Some(Err(e)) => panic!("send failed: {e}"),
            None => break, // stalled: the send stays posted
        }
        assert!(sent < 256 << 20, "never stalled");
    }
    drop(b);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut read = 0u64;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match client.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                assert!(chunk[..n].iter().all(|&x| x == 0xCD), "bytes altered");
                read += n as u64;
            }
            // The ring's teardown may run as task work on this thread and interrupt a read.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("after {read} of {sent} bytes: {e} (no end of stream)"),
        }
    }
    assert!(read >= sent, "read {read} of {sent} bytes reported sent");
}
