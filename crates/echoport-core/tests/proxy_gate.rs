//! The worker's PROXY header gate driven by scripted completions (no kernel): what is echoed,
//! which buffers are held, what is counted, and who is charged per IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use echoport_core::proxy::{Cidr, encode_v1, encode_v2, encode_v2_local};
use echoport_core::testing::FakeIo;
use echoport_core::worker::{Admission, Config, ProxyConfig, Worker};
use echoport_core::{Backend, BufId, Completion, ListenerId, Op, OpError, Received, Socket, Token};

const ZERO: Option<Duration> = Some(Duration::ZERO);
const BALANCER: &str = "127.0.0.9";

struct G {
    w: Worker<FakeIo>,
    t0: Instant,
    admission: Arc<Admission>,
}

impl G {
    fn new(per_ip: Option<u32>) -> G {
        let mut io = FakeIo::new();
        let l = io
            .add_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let admission = Admission::with_per_ip(100, per_ip);
        let cfg = Config {
            admission: admission.clone(),
            proxy: Some(ProxyConfig {
                from: vec!["127.0.0.8/31".parse::<Cidr>().unwrap()],
                timeout: Duration::from_secs(5),
            }),
            ..Config::default()
        };
        let mut g = G {
            w: Worker::new(io, &[l], cfg, Arc::new(AtomicBool::new(false))),
            t0: Instant::now(),
            admission,
        };
        g.turn(0);
        g.io().take_ops();
        g
    }

    fn io(&mut self) -> &mut FakeIo {
        self.w.backend_mut()
    }

    fn turn(&mut self, ms: u64) {
        let at = self.t0 + Duration::from_millis(ms);
        self.w.turn_at(at, ZERO).unwrap();
    }

    /// Accepts socket `fd` from `peer`; returns the token its receive was posted under.
    fn accept(&mut self, fd: u64, peer: &str) -> Option<Token> {
        self.io().peers.insert(Socket(fd), peer.parse().unwrap());
        self.io().complete(Completion::Accept {
            listener: ListenerId(0),
            result: Ok(Socket(fd)),
            more: true,
        });
        self.turn(0);
        self.io().take_ops().iter().find_map(|op| match *op {
            Op::Recv { token, .. } => Some(token),
            _ => None,
        })
    }

    /// Delivers `bytes` to `t` (a multishot receive going on); returns the buffer.
    fn recv(&mut self, t: Token, bytes: &[u8], ms: u64) -> BufId {
        let buf = self.io().lend(bytes);
        let len = bytes.len() as u32;
        self.io().complete(Completion::Recv {
            token: t,
            result: Ok(Received::Data { buf, len }),
            more: true,
        });
        self.turn(ms);
        buf
    }

    fn complete(&mut self, c: Completion, ms: u64) {
        self.io().complete(c);
        self.turn(ms);
    }

    /// The receive of `t` ends cancelled, as the backend reports after a cancel.
    fn cancelled(&mut self, t: Token, ms: u64) {
        self.complete(
            Completion::Recv {
                token: t,
                result: Err(OpError::Canceled),
                more: false,
            },
            ms,
        );
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v2(src: &str) -> Vec<u8> {
    let mut h = Vec::new();
    encode_v2(sa(src), sa("127.0.0.1:7007"), &mut h);
    h
}

fn sends(ops: &[Op]) -> Vec<(BufId, u32, u32)> {
    ops.iter()
        .filter_map(|op| match *op {
            Op::Send { buf, off, len, .. } => Some((buf, off, len)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_header_and_data_in_one_receive_echo_the_data_from_its_offset() {
    for header in [
        encode_v1(sa("192.0.2.1:5000"), sa("127.0.0.1:7007")).into_bytes(),
        v2("[2001:db8::1]:5000"),
    ] {
        let mut g = G::new(None);
        let t = g.accept(3, BALANCER).expect("a trusted peer is read");
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"hello");
        let buf = g.recv(t, &bytes, 0);
        let ops = g.io().take_ops();
        assert_eq!(
            sends(&ops),
            [(buf, header.len() as u32, 5)],
            "only the data is echoed, from the same buffer: {ops:?}"
        );
        assert_eq!(g.w.waiting_for_header(), 0);
        let s = g.w.stats();
        assert_eq!(s.proxy_v1 + s.proxy_v2, 1);
        assert!(g.io().copies.is_empty(), "nothing copied");
    }
}

#[test]
fn a_header_in_three_receives_holds_no_buffer_between_them() {
    let mut g = G::new(None);
    let t = g.accept(3, BALANCER).unwrap();
    let h = v2("192.0.2.7:4000");
    let (a, b) = (5, 20);
    for part in [&h[..a], &h[a..b]] {
        let buf = g.recv(t, part, 0);
        assert!(g.io().released.contains(&buf), "given back at once");
        assert!(g.io().lent.is_empty(), "no buffer held while waiting");
        assert!(sends(&g.io().take_ops()).is_empty());
    }
    let mut last = h[b..].to_vec();
    last.extend_from_slice(b"payload");
    let buf = g.recv(t, &last, 0);
    assert_eq!(sends(&g.io().take_ops()), [(buf, (h.len() - b) as u32, 7)]);
    assert_eq!(g.w.stats().proxy_v2, 1);
}

#[test]
fn a_header_one_byte_at_a_time_then_data() {
    let mut g = G::new(None);
    let t = g.accept(3, BALANCER).unwrap();
    let h = encode_v1(sa("192.0.2.1:1"), sa("192.0.2.2:2")).into_bytes();
    for &byte in &h {
        g.recv(t, &[byte], 0);
        assert!(g.io().lent.is_empty());
    }
    assert_eq!(g.w.waiting_for_header(), 0, "complete on its last byte");
    assert!(
        sends(&g.io().take_ops()).is_empty(),
        "the header is never echoed"
    );
    let buf = g.recv(t, b"x", 0);
    assert_eq!(sends(&g.io().take_ops()), [(buf, 0, 1)]);
    assert_eq!(g.w.stats().proxy_v1, 1);
    assert_eq!(g.w.stats().bytes_echoed, 0, "nothing sent yet");
}

/// Which counter a case must raise.
type Counter = fn(&echoport_core::stats::Stats) -> u64;

#[test]
fn bad_headers_close_without_echo_and_are_counted_by_reason() {
    let mut too_long = v2("192.0.2.1:1");
    too_long[14..16].copy_from_slice(&5000u16.to_be_bytes());
    let mut long_line = b"PROXY TCP4 ".to_vec();
    long_line.resize(200, b'1');
    let cases: [(&[u8], Counter); 6] = [
        (b"GET / HTTP/1.1\r\n\r\n", |s| s.proxy_not_proxy),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", |s| {
            s.proxy_malformed
        }),
        (&too_long, |s| s.proxy_too_long),
        (&long_line, |s| s.proxy_too_long),
        (&[b'P'; 200], |s| s.proxy_not_proxy),
        (b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x00", |s| {
            s.proxy_malformed
        }),
    ];
    for (bytes, counter) in cases {
        let mut g = G::new(None);
        let t = g.accept(3, BALANCER).unwrap();
        g.recv(t, bytes, 0);
        let ops = g.io().take_ops();
        assert!(sends(&ops).is_empty(), "{ops:?}");
        assert!(
            ops.contains(&Op::CancelRecv {
                token: t,
                sock: Socket(3)
            }),
            "{ops:?}"
        );
        g.cancelled(t, 0);
        assert_eq!(g.io().closed, [t]);
        assert!(g.io().lent.is_empty());
        assert_eq!(
            counter(&g.w.stats()),
            1,
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(g.w.connections(), 0);
        assert_eq!(g.admission.live(), 0, "its place is given back");
    }
}

#[test]
fn the_deadline_closes_a_dribbling_header_from_accept() {
    let mut g = G::new(None);
    let t = g.accept(3, BALANCER).unwrap();
    let h = v2("192.0.2.1:1");
    // A byte every 400 ms: the deadline is 5 s after accept, not after the last byte.
    for (i, &byte) in h.iter().take(12).enumerate() {
        g.recv(t, &[byte], i as u64 * 400);
    }
    assert_eq!(g.w.stats().proxy_timeouts, 0);
    g.turn(4_900);
    assert_eq!(g.w.stats().proxy_timeouts, 0, "not yet");
    g.turn(5_100);
    assert_eq!(g.w.stats().proxy_timeouts, 1);
    assert_eq!(g.w.stats().timeouts, 0, "counted as a header timeout only");
    g.cancelled(t, 5_100);
    assert_eq!(g.w.connections(), 0);
}

#[test]
fn local_and_unknown_are_served_as_the_real_peer() {
    let mut g = G::new(Some(1));
    let mut local = Vec::new();
    encode_v2_local(&mut local);
    local.extend_from_slice(b"ping");
    let t = g.accept(3, BALANCER).unwrap();
    let buf = g.recv(t, &local, 0);
    assert_eq!(sends(&g.io().take_ops()), [(buf, 16, 4)]);
    assert_eq!(g.w.stats().proxy_local, 1);
    // The peer's per-IP place is taken by the health check: an UNKNOWN from it is refused.
    let u = g.accept(4, BALANCER).unwrap();
    g.recv(u, b"PROXY UNKNOWN\r\nhi", 0);
    assert!(sends(&g.io().take_ops()).is_empty());
    let s = g.w.stats();
    assert_eq!((s.proxy_v1, s.proxy_unknown, s.refused), (1, 1, 1));
}

#[test]
fn per_ip_limits_follow_the_header_not_the_balancer() {
    let mut g = G::new(Some(1));
    let mut tokens = Vec::new();
    for (fd, src) in [(3, "192.0.2.1:1"), (4, "192.0.2.2:1"), (5, "192.0.2.1:2")] {
        let t = g.accept(fd, BALANCER).unwrap();
        let mut bytes = v2(src);
        bytes.push(b'!');
        g.recv(t, &bytes, 0);
        tokens.push((t, sends(&g.io().take_ops()).len()));
    }
    assert_eq!(tokens[0].1, 1, "first client echoed");
    assert_eq!(
        tokens[1].1, 1,
        "another client through the same balancer too"
    );
    assert_eq!(
        tokens[2].1, 0,
        "a second connection of 192.0.2.1 is over its limit"
    );
    assert_eq!(g.w.stats().refused, 1);
    // The refused one closes and gives its server-wide place back.
    g.cancelled(tokens[2].0, 0);
    assert_eq!(g.admission.live(), 2);
    assert!(
        g.admission
            .try_acquire_ip(BALANCER.parse::<IpAddr>().unwrap()),
        "the balancer itself holds no per-IP place"
    );
}

#[test]
fn an_untrusted_peer_is_closed_at_accept_before_any_read() {
    let mut g = G::new(None);
    assert_eq!(g.accept(3, "127.0.0.1"), None, "no receive posted");
    assert_eq!(g.accept(4, "::1"), None);
    let s = g.w.stats();
    assert_eq!((s.proxy_untrusted, s.refused, s.accepted), (2, 2, 0));
    assert_eq!(g.w.connections(), 0);
    assert_eq!(g.admission.live(), 0);
    assert!(
        g.accept(5, "::ffff:127.0.0.8").is_some(),
        "IPv4-mapped is its IPv4"
    );
}

#[test]
fn end_of_stream_mid_header_is_truncated() {
    let mut g = G::new(None);
    let t = g.accept(3, BALANCER).unwrap();
    g.recv(t, b"PROXY TCP4 1.2", 0);
    g.complete(
        Completion::Recv {
            token: t,
            result: Ok(Received::Eof),
            more: false,
        },
        0,
    );
    assert_eq!(g.w.stats().proxy_truncated, 1);
    assert_eq!(g.w.connections(), 0);
    assert!(sends(&g.io().take_ops()).is_empty());
}

#[test]
fn a_stop_closes_connections_still_waiting_for_their_header() {
    let mut g = G::new(None);
    let t = g.accept(3, BALANCER).unwrap();
    g.recv(t, b"PRO", 0);
    g.w.begin_shutdown();
    g.cancelled(t, 0);
    assert_eq!(g.w.connections(), 0);
    assert!(!g.io().ops.iter().any(|o| matches!(o, Op::Shutdown { .. })));
}

/// xorshift64*: the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Sends complete at once: completes every send posted so far, returning the bytes sent.
fn complete_sends(g: &mut G) -> Vec<u8> {
    let mut out = Vec::new();
    for op in g.io().take_ops() {
        if let Op::Send {
            token,
            buf,
            off,
            len,
            ..
        } = op
        {
            let bytes = &g.io().contents[&buf][off as usize..(off + len) as usize];
            out.extend_from_slice(bytes);
            g.io().complete(Completion::Send {
                token,
                result: Ok(len),
            });
        }
    }
    g.turn(0);
    out
}

#[test]
fn any_cutting_of_header_and_data_echoes_exactly_the_data() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..500 {
        let mut g = G::new(None);
        let t = g.accept(3, BALANCER).unwrap();
        let src = SocketAddr::from(([192, 0, 2, rng.below(256) as u8], rng.below(65536) as u16));
        let header = match rng.below(3) {
            0 => encode_v1(src, sa("127.0.0.1:7007")).into_bytes(),
            1 => v2(&src.to_string()),
            _ => {
                let mut h = Vec::new();
                encode_v2_local(&mut h);
                h
            }
        };
        let data: Vec<u8> = (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
        let mut stream = header.clone();
        stream.extend_from_slice(&data);
        let mut echoed = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let most = if rng.below(2) == 0 { 8 } else { 1500 };
            let n = (1 + rng.below(most)).min(stream.len() - at);
            g.recv(t, &stream[at..at + n], 0);
            at += n;
            if g.w.waiting_for_header() > 0 {
                assert!(
                    g.io().lent.is_empty(),
                    "case {case}: a buffer held mid-header"
                );
            }
            echoed.extend(complete_sends(&mut g));
        }
        assert_eq!(echoed, data, "case {case}: {} header bytes", header.len());
        let s = g.w.stats();
        assert_eq!(s.proxy_v1 + s.proxy_v2 + s.proxy_local, 1, "case {case}");
        assert_eq!(s.bytes_echoed, data.len() as u64);
        g.complete(
            Completion::Recv {
                token: t,
                result: Ok(Received::Eof),
                more: false,
            },
            0,
        );
        assert_eq!(g.w.connections(), 0, "case {case}: closed after the echo");
        assert!(
            g.io().lent.is_empty(),
            "case {case}: every buffer given back"
        );
    }
}
