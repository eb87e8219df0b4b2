//! What only the IOCP backend does, driven in-process: zero-byte receives, accept groups
//! over several completion ports, receives one-shot at the connection's allowance, the
//! pool's checks as IOCP wires them, and dropping a port (drain, and every socket closed).
//!
//! What every backend must do is `contract.rs`, which runs on IOCP too. Windows only; CI runs
//! these under wine (`ci/windows.sh test`). Clients are plain `std::net` sockets on
//! 127.0.0.1.
#![cfg(windows)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use echoport_core::stats::Stats;
use echoport_core::worker::{Config as WorkerConfig, Worker};
use echoport_core::{Backend, Completion, Op, OpError, Received, Submit, Token, Waker};
use echoport_io::iocp::{Config, Iocp, IocpStats};
use echoport_io::pool::PoolConfig;

/// The contract's payload bytes, shifted per client (`seed`), so that a byte from another
/// client's stream or from the wrong position shows.
fn payload(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(7) + i / 300 + seed.wrapping_mul(31)) as u8)
        .collect()
}

/// Sends `data` (writing from a second thread), half-closes, and reads the echo to the end.
/// Sends `data` (writing from a second thread), half-closes, and reads the echo to the end.
fn echo_all(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(7001) {
            w.write_all(chunk).expect("write");
        }
        w.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read echo");
    writer.join().unwrap();
    got
}

struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<dyn Waker>,
    handle: JoinHandle<(Stats, IocpStats)>,
}

impl Server {
    /// Stops the worker gracefully and returns what it served.
    fn stop(self) -> (Stats, IocpStats) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        self.handle.join().expect("worker thread")
    }
}

/// Runs one worker on its own completion port, serving `listener` (or a clone of it).
fn start(cfg: Config, listener: TcpListener) -> Server {
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let stop2 = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut b = Iocp::new(&cfg).expect("completion port");
        let id = b.add_listener(listener).expect("listener");
        tx.send(b.waker()).unwrap();
        let mut w = Worker::new(b, &[id], WorkerConfig::default(), stop2.clone());
        let deadline = loop {
            if stop2.load(Ordering::Acquire) {
                w.begin_shutdown();
                break Instant::now() + Duration::from_secs(15);
            }
            w.turn(Some(Duration::from_millis(100))).expect("turn");
        };
        while w.connections() > 0 && Instant::now() < deadline {
            w.turn(Some(Duration::from_millis(100))).expect("turn");
        }
        assert_eq!(w.connections(), 0, "connections left after shutdown");
        (w.stats(), w.backend().iocp_stats())
    });
    let waker = rx.recv().expect("worker started");
    Server {
        addr,
        stop,
        waker,
        handle,
    }
}

fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

#[test]
fn zero_byte_receives_and_parking_serve_when_buffers_are_scarce() {
    // Four buffers for eight busy clients: every receive is a zero-byte one, and some find
    // no buffer when their data arrives (the worker parks and retries them).
    let cfg = Config {
        pool: PoolConfig {
            buffers: 4,
            ..PoolConfig::default()
        },
        zero_byte_below: Some(u32::MAX),
        ..Config::default()
    };
    let srv = start(cfg, loopback_listener());
    let addr = srv.addr;
    let clients: Vec<_> = (0..8u32)
        .map(|i| {
            std::thread::spawn(move || {
                let data = payload(100 + i, 48 * 1024);
                assert!(echo_all(addr, data.clone()) == data, "client {i}");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let (stats, io) = srv.stop();
    assert_eq!(stats.accepted, 8);
    assert_eq!(stats.bytes_echoed, 8 * 48 * 1024);
    assert!(io.zero_byte_recvs > 0, "{io:?}");
}

#[test]
fn accepts_are_dealt_round_robin_over_the_group() {
    let listener = loopback_listener();
    let clone = listener.try_clone().unwrap();
    let a = start(Config::default(), listener);
    let b = start(Config::default(), clone);
    let addr = a.addr;
    for i in 0..8u32 {
        let data = payload(200 + i, 1000);
        assert!(echo_all(addr, data.clone()) == data, "client {i}");
    }
    let (sa, ia) = a.stop();
    let (sb, ib) = b.stop();
    assert_eq!(sa.accepted + sb.accepted, 8);
    assert_eq!(sa.accepted, 4, "round-robin over two members");
    assert_eq!(sb.accepted, 4, "round-robin over two members");
    // Whichever registered first accepts for both and hands the other its half.
    assert_eq!(ia.handed_over + ib.handed_over, 4, "{ia:?} {ib:?}");
    assert_eq!(ia.handed_in + ib.handed_in, 4, "{ia:?} {ib:?}");
}

/// A connected pair: the client side, and the server side adopted into `b`.
fn adopted_pair(b: &mut Iocp) -> (TcpStream, echoport_core::Socket) {
    let l = loopback_listener();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, b.adopt(s).unwrap())
}

fn wait_for(b: &mut Iocp, ms: u64) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(ms);
    while out.is_empty() && Instant::now() < deadline {
        b.wait(&mut out, Some(Duration::from_millis(20))).unwrap();
    }
    out
}

#[test]
fn a_cancel_that_races_a_zero_byte_receive_still_ends_it_as_cancelled() {
    let cfg = Config {
        zero_byte_below: Some(u32::MAX),
        ..Config::default()
    };
    let mut b = Iocp::new(&cfg).unwrap();
    let (mut client, sock) = adopted_pair(&mut b);
    let token = Token::new(5, 2);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    client.write_all(b"abc").unwrap();
    // Let the zero-byte receive complete (data is waiting) before the cancel is requested.
    std::thread::sleep(Duration::from_millis(200));
    b.push(Op::CancelRecv { token, sock });
    let got = wait_for(&mut b, 2000);
    assert_eq!(
        got,
        vec![Completion::Recv {
            token,
            result: Err(OpError::Canceled),
            more: false
        }],
        "no real receive may be left pending behind a cancel"
    );
    assert_eq!(b.inflight(), 0);
    // The bytes stayed in the socket for the next receive.
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match wait_for(&mut b, 2000)[..] {
            [
                Completion::Recv {
                    result: Ok(Received::Data { buf, len }),
                    ..
                },
            ] => {
                seen.extend_from_slice(&b.buf(buf)[..len as usize]);
                b.release(buf);
                if seen.len() < 3 {
                    b.push(Op::Recv {
                        token,
                        sock,
                        max: u32::MAX,
                    });
                }
            }
            ref other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, b"abc");
    assert!(b.iocp_stats().zero_byte_recvs >= 2);
    b.push(Op::Close { token, sock });
}

#[test]
fn a_receive_delivers_at_most_its_allowance_with_or_without_a_zero_byte_wait() {
    for zero_byte_below in [Some(0), Some(u32::MAX)] {
        let mut b = Iocp::new(&Config {
            zero_byte_below,
            ..Config::default()
        })
        .unwrap();
        let (mut client, sock) = adopted_pair(&mut b);
        let token = Token::new(4, 1);
        client.write_all(b"0123456789").unwrap();
        std::thread::sleep(Duration::from_millis(100)); // all ten bytes are waiting
        let mut seen = Vec::new();
        for max in [3, u32::MAX] {
            b.push(Op::Recv { token, sock, max });
            match wait_for(&mut b, 2000)[..] {
                [
                    Completion::Recv {
                        result: Ok(Received::Data { buf, len }),
                        more: false,
                        ..
                    },
                ] => {
                    if max == 3 {
                        assert_eq!(len, 3, "{zero_byte_below:?}: the allowance was 3 bytes");
                    }
                    seen.extend_from_slice(&b.buf(buf)[..len as usize]);
                    b.release(buf);
                }
                ref other => panic!("{zero_byte_below:?}: unexpected {other:?}"),
            }
        }
        assert_eq!(seen, b"0123456789", "{zero_byte_below:?}");
        assert_eq!(
            b.iocp_stats().zero_byte_recvs > 0,
            zero_byte_below == Some(u32::MAX)
        );
        assert_eq!(
            b.free_buffers(),
            b.total_buffers(),
            "every buffer came back"
        );
        b.push(Op::Close { token, sock });
    }
}

/// Runs `f`, which hands the pool a buffer the caller does not hold: a debug build stops on
/// the pool's assertion, a release build only logs (the counter says it happened).
fn refused(f: impl FnOnce()) {
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    if cfg!(debug_assertions) {
        let e = r.expect_err("a debug build asserts on a refused hand-over");
        let msg = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("");
        assert!(msg.contains("buffer pool"), "{msg}");
    } else {
        assert!(r.is_ok());
    }
}

#[test]
fn a_double_release_and_a_send_of_a_buffer_not_lent_are_refused() {
    let mut b = Iocp::new(&Config {
        pool: PoolConfig {
            buffers: 4,
            buf_size: 4096,
            send_buffers: 2,
        },
        zero_byte_below: Some(0),
        ..Config::default()
    })
    .unwrap();
    let (mut client, sock) = adopted_pair(&mut b);
    let token = Token::new(2, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    assert_eq!(b.free_buffers(), 3, "the posted receive holds one");
    client.write_all(b"abc").unwrap();
    let [
        Completion::Recv {
            result: Ok(Received::Data { buf, len: 3 }),
            ..
        },
    ] = wait_for(&mut b, 2000)[..]
    else {
        panic!("expected the three bytes");
    };
    b.release(buf);
    assert_eq!(b.buffer_misuses(), 0);
    refused(|| b.release(buf));
    assert_eq!(b.buffer_misuses(), 1);
    assert_eq!(b.free_buffers(), 4, "the buffer is free once, not twice");

    // A send naming the free buffer reaches no kernel: it ends with an error (a release
    // build) or stops at the assertion (a debug build), and the client receives nothing.
    refused(|| {
        b.push(Op::Send {
            token,
            sock,
            buf,
            off: 0,
            len: 3,
        })
    });
    assert_eq!(b.buffer_misuses(), 2);
    assert_eq!(b.inflight(), 0, "nothing was posted");
    let got = wait_for(&mut b, 200);
    if cfg!(debug_assertions) {
        assert!(got.is_empty(), "{got:?}");
    } else {
        assert!(
            matches!(got[..], [Completion::Send { result: Err(_), .. }]),
            "{got:?}"
        );
    }
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let err = client.read(&mut [0u8; 8]).expect_err("no bytes were sent");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    b.push(Op::Close { token, sock });
}

#[test]
fn dropping_the_port_with_operations_pending_cancels_and_drains_them() {
    let l = loopback_listener();
    let addr = l.local_addr().unwrap();
    let mut b = Iocp::new(&Config::default()).unwrap();
    let id = b.add_listener(l).unwrap();
    b.push(Op::Accept { listener: id });
    let (client, sock) = adopted_pair(&mut b);
    b.push(Op::Recv {
        token: Token::new(0, 0),
        sock,
        max: u32::MAX,
    });
    assert!(wait_for(&mut b, 50).is_empty());
    assert_eq!(b.inflight(), Config::default().accepts_ahead as usize + 1);
    let start = Instant::now();
    drop(b);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the drain finished, nothing leaked"
    );
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) => assert_ne!(e.kind(), ErrorKind::TimedOut, "{e}"),
        Ok(_) => panic!("the listener was closed with the port"),
    }
    drop(client);
}

/// Reads from each client without blocking; returns how many now see their connection
/// closed (end of stream or a reset). A client that receives bytes is a failure: nobody sent
/// any.
fn closed_peers(clients: &[TcpStream], closed: &mut [bool]) -> usize {
    for (c, done) in clients.iter().zip(closed.iter_mut()).filter(|(_, d)| !**d) {
        match (&*c).read(&mut [0u8; 16]) {
            Ok(0) => *done = true,
            Ok(n) => panic!("{n} bytes from a server that was sent nothing"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                *done = true
            }
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
    closed.iter().filter(|d| **d).count()
}

/// Polls `closed_peers` until `want` are closed or `limit` passes; returns the count.
fn await_closed(clients: &[TcpStream], closed: &mut [bool], want: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let n = closed_peers(clients, closed);
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dropping_a_member_closes_every_socket_dealt_to_it() {
    // 600 clients over a group of two: 300 handed to the member, more than one reap takes
    // (256). The member reaps once, takes those connections and never closes them, and is
    // dropped with the rest still queued on its port. Its 300 peers must all see the close;
    // the acceptor's must not, until the acceptor is dropped too.
    const CLIENTS: usize = 600;
    let listener = loopback_listener();
    let addr = listener.local_addr().unwrap();
    let clone = listener.try_clone().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (dealt_tx, dealt_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    // The acceptor, on its own thread: it accepts for both, keeps its own connections open.
    let acceptor = std::thread::spawn(move || {
        let mut b = Iocp::new(&Config::default()).expect("completion port");
        let id = b.add_listener(listener).expect("listener");
        b.push(Op::Accept { listener: id });
        ready_tx.send(()).unwrap();
        let (mut own, mut told) = (0u64, false);
        let deadline = Instant::now() + Duration::from_secs(60);
        while stop_rx.try_recv().is_err() && Instant::now() < deadline {
            let mut out = Vec::new();
            b.wait(&mut out, Some(Duration::from_millis(20))).unwrap();
            own += out
                .iter()
                .filter(|c| matches!(c, Completion::Accept { result: Ok(_), .. }))
                .count() as u64;
            let io = b.iocp_stats();
            if own + io.handed_over == CLIENTS as u64 && !told {
                told = true;
                dealt_tx.send((own, io)).unwrap();
            }
        }
        // Dropped here with its own connections still open.
    });
    ready_rx.recv().unwrap();
    let mut member = Iocp::new(&Config::default()).expect("completion port");
    member.add_listener(clone).expect("joins the group");
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    let (own, io) = dealt_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("every client accepted and dealt");
    assert_eq!(own, 300, "round-robin over two: {io:?}");
    assert_eq!(io.handed_over, 300, "{io:?}");

    // One reap: at most a batch of the handed-over sockets reaches the member's state
    // machine (which never closes them); the rest stay queued.
    let mut out = Vec::new();
    member.wait(&mut out, Some(Duration::from_secs(5))).unwrap();
    let taken = member.iocp_stats().handed_in;
    assert!(taken > 0 && taken < 300, "handed in {taken} of 300");
    assert_eq!(out.len() as u64, taken);

    let mut closed = vec![false; CLIENTS];
    assert_eq!(closed_peers(&clients, &mut closed), 0, "nothing closed yet");
    drop(member);
    let n = await_closed(&clients, &mut closed, 300, Duration::from_secs(10));
    assert_eq!(
        n, 300,
        "every peer dealt to the dropped member sees the close"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        closed_peers(&clients, &mut closed),
        300,
        "the acceptor's connections stay open"
    );

    stop_tx.send(()).unwrap();
    acceptor.join().expect("acceptor thread");
    let n = await_closed(&clients, &mut closed, CLIENTS, Duration::from_secs(10));
    assert_eq!(
        n, CLIENTS,
        "the acceptor's drop closed its open connections"
    );
}
