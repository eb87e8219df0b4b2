//! io_uring's adopted direct descriptors (`Config::direct_adopt`): a client hands in more
//! connected streams than one table (and, at scale, than `RLIMIT_NOFILE`) holds; each is
//! registered in a ring's table and its plain descriptor closed at once, every one still
//! echoes, and closing one frees its slot for the next. And a receive posted with no limit
//! (`max: u32::MAX`, as the load generator posts them) stays posted across messages.
#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use echoport_core::{Backend, Completion, Op, OpError, Received, Socket, Submit, Token};
use echoport_io::uring::{Config, Uring};

const TABLE: u32 = 16;
const RINGS: u32 = 4;

fn new_ring() -> Uring {
    ring(64, TABLE, RINGS)
}

/// A ring that adopts streams: `buffers` receive buffers, tables of `table` slots, at most
/// `rings` rings.
fn ring(buffers: u32, table: u32, rings: u32) -> Uring {
    Uring::new(&Config {
        pool: echoport_io::pool::PoolConfig {
            buffers,
            buf_size: 4096,
            send_buffers: 8,
        },
        cq_entries: 1024,
        sq_entries: 256,
        direct_files: table,
        max_rings: rings,
        direct_accept: false,
        direct_adopt: true,
        ..Default::default()
    })
    .expect("io_uring with direct descriptors (CI machines have io_uring: this must not fail)")
}

/// An adopted stream with a receive posted on it, and the peer the test keeps.
struct Adopted {
    token: Token,
    sock: Socket,
    /// The ring whose table holds it.
    ring: u64,
    peer: TcpStream,
}

/// Adopts each pair's stream (connection `i` gets token `i`) and posts a receive on it.
fn adopt_receiving(b: &mut Uring, pairs: Vec<(TcpStream, TcpStream)>) -> Vec<Adopted> {
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, (c, peer))| {
            let sock = b.adopt(c).expect("a table has room");
            let token = Token::new(i as u32, 1);
            b.push(Op::Recv {
                token,
                sock,
                max: u32::MAX,
            });
            let ring = (sock.0 >> 32) & 0xffff;
            Adopted {
                token,
                sock,
                ring,
                peer,
            }
        })
        .collect()
}

/// Waits (at most 3 s) for `n` receives that bring data, giving each buffer back; their
/// tokens.
fn receive_data(b: &mut Uring, n: usize) -> Vec<Token> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut out = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        out.clear();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        for c in out.drain(..) {
            if let Completion::Recv {
                token,
                result: Ok(Received::Data { buf, .. }),
                ..
            } = c
            {
                got.push(token);
                b.release(buf);
            }
        }
    }
    got
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// `n` connected pairs: (the stream to adopt, the peer the test keeps).
fn pairs(l: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let addr = l.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let c = TcpStream::connect(addr).unwrap();
            let (p, _) = l.accept().unwrap();
            p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            (c, p)
        })
        .collect()
}

/// Waits for one receive on each token in `want` and echoes what came back on its socket;
/// returns once every send is done.
fn echo_all(b: &mut Uring, want: &[(Token, Socket)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut received = 0;
    let mut sent = 0;
    let mut out = Vec::new();
    let mut lent = std::collections::HashMap::new();
    while (received < want.len() || sent < want.len()) && Instant::now() < deadline {
        out.clear();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        for c in out.drain(..) {
            match c {
                Completion::Recv {
                    token,
                    result: Ok(Received::Data { buf, len }),
                    ..
                } => {
                    received += 1;
                    let sock = want.iter().find(|w| w.0 == token).expect("a known token").1;
                    lent.insert(token, buf);
                    b.push(Op::Send {
                        token,
                        sock,
                        buf,
                        off: 0,
                        len,
                    });
                }
                Completion::Recv {
                    token,
                    result: Err(OpError::NoBuffers),
                    more: false,
                } => {
                    // The ring's buffers are all out: post again once some are back, as the
                    // state machine does.
                    let sock = want.iter().find(|w| w.0 == token).expect("a known token").1;
                    b.push(Op::Recv {
                        token,
                        sock,
                        max: u32::MAX,
                    });
                }
                Completion::Send { token, result } => {
                    assert!(result.is_ok(), "{result:?}");
                    b.release(lent.remove(&token).expect("a send of a lent buffer"));
                    sent += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        (received, sent),
        (want.len(), want.len()),
        "every stream echoed"
    );
}

#[test]
fn adopted_streams_fill_several_tables_keep_no_descriptor_and_free_their_slots_on_close() {
    let mut b = new_ring();
    assert!(
        b.describe().contains("direct-fds (adopted)"),
        "{}",
        b.describe()
    );
    assert_eq!(b.max_connections(), Some((TABLE * RINGS) as usize));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let n = (TABLE * RINGS) as usize;
    let conns = pairs(&l, n);
    let before = open_fds();
    let adopted = adopt_receiving(&mut b, conns);
    let socks: Vec<(Token, Socket)> = adopted.iter().map(|a| (a.token, a.sock)).collect();
    let mut peers: Vec<TcpStream> = adopted.into_iter().map(|a| a.peer).collect();
    // Each adopted stream's descriptor is closed; only the extra rings and their eventfds
    // are new (two descriptors per ring beyond the first).
    let after = open_fds();
    assert!(
        after + n <= before + 2 * (RINGS as usize - 1),
        "{n} adopted streams still hold descriptors: {before} open before, {after} after"
    );
    let rings: std::collections::HashSet<u64> =
        socks.iter().map(|s| (s.1.0 >> 32) & 0xffff).collect();
    assert_eq!(rings.len(), RINGS as usize, "the streams span every ring");

    // Every one echoes.
    for (i, p) in peers.iter_mut().enumerate() {
        p.write_all(format!("hello {i:03}").as_bytes()).unwrap();
    }
    echo_all(&mut b, &socks);
    for (i, p) in peers.iter_mut().enumerate() {
        let mut got = [0u8; 9];
        p.read_exact(&mut got).unwrap();
        assert_eq!(&got, format!("hello {i:03}").as_bytes());
    }

    // Full: one more is refused, with the reason.
    let mut extra = pairs(&l, 1);
    let (c, _p) = extra.pop().unwrap();
    let e = b.adopt(c).expect_err("every table is full");
    assert!(e.to_string().contains("full"), "{e}");

    // Closing frees the slots: the peers see the end of stream, and as many new streams fit.
    // (A receive is still posted on each: cancel it first, as the state machine does.)
    for &(token, sock) in &socks[..10] {
        b.push(Op::CancelRecv { token, sock });
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ended = 0;
    while ended < 10 && Instant::now() < deadline {
        out.clear();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        ended += out
            .iter()
            .filter(|c| matches!(c, Completion::Recv { more: false, .. }))
            .count();
    }
    assert_eq!(ended, 10, "the cancelled receives ended");
    for &(token, sock) in &socks[..10] {
        b.push(Op::Close { token, sock });
    }
    b.wait(&mut out, Some(Duration::ZERO)).unwrap();
    for p in &mut peers[..10] {
        let mut rest = Vec::new();
        assert_eq!(
            p.read_to_end(&mut rest).unwrap(),
            0,
            "closed: end of stream"
        );
    }
    for (c, _p) in pairs(&l, 10) {
        b.adopt(c).expect("a freed slot takes a new stream");
    }
}

#[test]
fn a_ring_that_adopts_refuses_listeners() {
    let mut b = new_ring();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = b.add_listener(l).expect_err("slots are the adopter's");
    assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
}

#[test]
fn a_receive_without_a_limit_stays_posted_across_messages() {
    let mut b = new_ring();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (c, mut p) = pairs(&l, 1).pop().unwrap();
    let sock = b.adopt(c).unwrap();
    let token = Token::new(0, 1);
    b.push(Op::Recv {
        token,
        sock,
        max: u32::MAX,
    });
    let mut out = Vec::new();
    for i in 0..5 {
        p.write_all(format!("message {i}").as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            out.clear();
            b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
            if let Some(&Completion::Recv { result, more, .. }) = out.first() {
                break (result, more);
            }
            assert!(Instant::now() < deadline, "message {i} never arrived");
        };
        let (Ok(Received::Data { buf, .. }), more) = got else {
            panic!("message {i}: {got:?}");
        };
        // The kernel subtracts from the limit as a signed int: u32::MAX taken as a limit
        // would end the receive here, after its first message.
        assert!(more, "message {i} ended the receive");
        b.release(buf);
    }
}

#[test]
fn a_burst_on_an_added_ring_is_delivered_whole() {
    // Two tables of 64: all 64 connections of the second ring receive at once. That ring's
    // completions reach the loop only through its eventfd, which ring 0 watches: every one
    // of them must come, not just those of the first wake-up.
    let mut b = ring(512, 64, 2);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut adopted = adopt_receiving(&mut b, pairs(&l, 128));
    let on_second: std::collections::HashSet<Token> = adopted
        .iter()
        .filter(|a| a.ring == 1)
        .map(|a| a.token)
        .collect();
    assert_eq!(
        on_second.len(),
        64,
        "the second ring holds the second table"
    );
    b.wait(&mut Vec::new(), Some(Duration::ZERO)).unwrap();
    for a in adopted.iter_mut().filter(|a| a.ring == 1) {
        a.peer.write_all(b"burst").unwrap();
    }
    let got: std::collections::HashSet<Token> = receive_data(&mut b, 64).into_iter().collect();
    assert_eq!(got, on_second, "every connection of the burst was received");
}

#[test]
fn a_ring_that_runs_dry_does_not_starve_the_others_and_is_refilled_first() {
    // 64 buffers over two tables of 32: ring 0 fills first (three quarters of the pool),
    // ring 1 gets what is left. All of ring 1's connections receive at once and keep what
    // they got: ring 1 runs dry while ring 0 still holds buffers.
    let mut b = ring(64, 32, 2);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut adopted = adopt_receiving(&mut b, pairs(&l, 64));
    let mut out = Vec::new();
    b.wait(&mut out, Some(Duration::ZERO)).unwrap();
    for a in adopted.iter_mut().filter(|a| a.ring == 1) {
        a.peer.write_all(b"dry").unwrap();
    }
    let (mut held, mut dry) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(3);
    while held.len() + dry.len() < 32 && Instant::now() < deadline {
        out.clear();
        b.wait(&mut out, Some(Duration::from_millis(50))).unwrap();
        for c in out.drain(..) {
            match c {
                Completion::Recv {
                    result: Ok(Received::Data { buf, .. }),
                    ..
                } => held.push(buf),
                Completion::Recv {
                    token,
                    result: Err(OpError::NoBuffers),
                    ..
                } => dry.push(token),
                _ => {}
            }
        }
    }
    assert!(!dry.is_empty(), "ring 1 ran dry ({} received)", held.len());
    assert_eq!(held.len() + dry.len(), 32);
    assert!(
        b.free_buffers() > 0,
        "ring 0's buffers are still free for its connections"
    );
    // Once the held buffers come back, the dry ring gets them and every receive completes.
    for buf in held.drain(..) {
        b.release(buf);
    }
    for &token in &dry {
        let sock = adopted[token.id as usize].sock;
        b.push(Op::Recv {
            token,
            sock,
            max: u32::MAX,
        });
    }
    assert_eq!(
        receive_data(&mut b, dry.len()).len(),
        dry.len(),
        "every receive that found ring 1 dry completed later"
    );
}
