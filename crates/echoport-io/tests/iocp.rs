//! The IOCP backend driven in-process: by the echo worker, and directly op by op.
//!
//! Windows only; CI runs these under wine (`ci/windows.sh test`). Clients are plain blocking
//! `std::net` sockets on 127.0.0.1.
#![cfg(windows)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use echoport_core::stats::Stats;
use echoport_core::worker::{Config as WorkerConfig, Worker};
use echoport_core::{Backend, Completion, OpError, Received, Submit, Token, Waker};
use echoport_io::iocp::{Config, Iocp, IocpStats};
use echoport_io::pool::PoolConfig;

/// Bytes that differ per client and per position, so a misplaced or foreign byte shows.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

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
fn concurrent_clients_get_exactly_their_bytes_back() {
    let srv = start(Config::default(), loopback_listener());
    let addr = srv.addr;
    let clients: Vec<_> = (0..16u32)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pattern(i, 64 * 1024 + i as usize * 97);
                let got = echo_all(addr, data.clone());
                assert!(
                    got == data,
                    "client {i}: echo differs ({} bytes back)",
                    got.len()
                );
                data.len() as u64
            })
        })
        .collect();
    let sent: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let (stats, _) = srv.stop();
    assert_eq!(stats.accepted, 16);
    assert_eq!(stats.bytes_echoed, sent);
    assert_eq!(stats.errors, 0);
}

#[test]
fn one_mebibyte_round_trips() {
    let srv = start(Config::default(), loopback_listener());
    let data = pattern(7, 1 << 20);
    let got = echo_all(srv.addr, data.clone());
    assert_eq!(got.len(), data.len());
    assert!(got == data, "1 MiB echo differs");
    let (stats, _) = srv.stop();
    assert_eq!(stats.bytes_echoed, 1 << 20);
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
                let data = pattern(100 + i, 48 * 1024);
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
        let data = pattern(200 + i, 1000);
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

#[test]
fn a_reset_client_does_not_disturb_the_next_ones() {
    let srv = start(Config::default(), loopback_listener());
    {
        let s = TcpStream::connect(srv.addr).unwrap();
        (&s).write_all(b"about to vanish").unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(s); // linger 0: an RST, not a FIN
    }
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..4u32 {
        let data = pattern(300 + i, 20_000);
        assert!(echo_all(srv.addr, data.clone()) == data, "client {i}");
    }
    let (stats, _) = srv.stop();
    assert_eq!(stats.accepted, 5);
    assert_eq!(stats.closed, 5);
}

#[test]
fn stopping_echoes_what_was_received_then_closes() {
    let srv = start(Config::default(), loopback_listener());
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let addr = srv.addr;
    let stopper = std::thread::spawn(move || srv.stop());
    // The server shuts down its side: we read end of stream, then close ours.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(s);
    let (stats, _) = stopper.join().unwrap();
    assert_eq!(stats.closed, 1);
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "the listener is closed after a stop"
    );
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
fn a_cancelled_receive_completes_once_as_cancelled_and_the_next_one_works() {
    let mut b = Iocp::new(&Config::default()).unwrap();
    let (mut client, sock) = adopted_pair(&mut b);
    let token = Token::new(3, 1);
    b.push(echoport_core::Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    assert!(wait_for(&mut b, 100).is_empty(), "nothing was sent yet");
    assert_eq!(b.inflight(), 1);
    b.push(echoport_core::Op::CancelRecv { token, sock });
    let got = wait_for(&mut b, 2000);
    assert_eq!(
        got,
        vec![Completion::Recv {
            token,
            result: Err(OpError::Canceled),
            more: false
        }]
    );
    assert_eq!(b.inflight(), 0);
    assert!(
        wait_for(&mut b, 100).is_empty(),
        "exactly one final completion"
    );

    b.push(echoport_core::Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    client.write_all(b"x").unwrap();
    let got = wait_for(&mut b, 2000);
    let [Completion::Recv {
        token: t,
        result: Ok(Received::Data { buf, len: 1 }),
        more: false,
    }] = got[..]
    else {
        panic!("expected one byte, got {got:?}");
    };
    assert_eq!(t, token);
    assert_eq!(b.buf(buf)[0], b'x');
    b.release(buf);
    b.push(echoport_core::Op::Close { token, sock });
    let mut rest = Vec::new();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed by the server");
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
    b.push(echoport_core::Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    client.write_all(b"abc").unwrap();
    // Let the zero-byte receive complete (data is waiting) before the cancel is requested.
    std::thread::sleep(Duration::from_millis(200));
    b.push(echoport_core::Op::CancelRecv { token, sock });
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
    b.push(echoport_core::Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match wait_for(&mut b, 2000)[..] {
            [Completion::Recv {
                result: Ok(Received::Data { buf, len }),
                ..
            }] => {
                seen.extend_from_slice(&b.buf(buf)[..len as usize]);
                b.release(buf);
                if seen.len() < 3 {
                    b.push(echoport_core::Op::Recv {
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
    b.push(echoport_core::Op::Close { token, sock });
}

#[test]
fn a_send_from_an_allocated_buffer_arrives_and_completes_with_its_length() {
    let mut b = Iocp::new(&Config::default()).unwrap();
    let (mut client, sock) = adopted_pair(&mut b);
    let token = Token::new(0, 0);
    let buf = b.alloc_buf().expect("a send buffer");
    b.buf_mut(buf)[..5].copy_from_slice(b"hello");
    b.push(echoport_core::Op::Send {
        token,
        sock,
        buf,
        off: 1,
        len: 4,
    });
    let got = wait_for(&mut b, 2000);
    assert_eq!(
        got,
        vec![Completion::Send {
            token,
            result: Ok(4)
        }]
    );
    b.release(buf);
    let mut four = [0u8; 4];
    client.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ello");
    b.push(echoport_core::Op::Close { token, sock });
}

#[test]
fn end_of_stream_is_reported_after_the_data() {
    let mut b = Iocp::new(&Config::default()).unwrap();
    let (mut client, sock) = adopted_pair(&mut b);
    let token = Token::new(1, 0);
    client.write_all(b"tail").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut seen = Vec::new();
    let mut eof = false;
    for _ in 0..10 {
        b.push(echoport_core::Op::Recv {
            token,
            sock,
            max: u32::MAX,
        });
        match wait_for(&mut b, 2000)[..] {
            [Completion::Recv {
                result: Ok(Received::Data { buf, len }),
                ..
            }] => {
                seen.extend_from_slice(&b.buf(buf)[..len as usize]);
                b.release(buf);
            }
            [Completion::Recv {
                result: Ok(Received::Eof),
                ..
            }] => {
                eof = true;
                break;
            }
            ref other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, b"tail");
    assert!(eof);
    b.push(echoport_core::Op::Close { token, sock });
}

#[test]
fn the_waker_ends_a_blocked_wait() {
    let mut b = Iocp::new(&Config::default()).unwrap();
    let w = b.waker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        w.wake();
        w.wake(); // coalesced with the first
    });
    let start = Instant::now();
    let mut out = Vec::new();
    b.wait(&mut out, None).unwrap();
    t.join().unwrap();
    assert_eq!(out, vec![Completion::Wake]);
    assert!(start.elapsed() >= Duration::from_millis(50));
    let mut more = Vec::new();
    b.wait(&mut more, Some(Duration::from_millis(50))).unwrap();
    assert!(more.len() <= 1, "at most one more wake-up: {more:?}");
}

#[test]
fn dropping_the_port_with_operations_pending_cancels_and_drains_them() {
    let l = loopback_listener();
    let addr = l.local_addr().unwrap();
    let mut b = Iocp::new(&Config::default()).unwrap();
    let id = b.add_listener(l).unwrap();
    b.push(echoport_core::Op::Accept { listener: id });
    let (client, sock) = adopted_pair(&mut b);
    b.push(echoport_core::Op::Recv {
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
        b.push(echoport_core::Op::Accept { listener: id });
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
